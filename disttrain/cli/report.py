"""``disttrain report DIR...``: pictures of run directories (``disttrain.observe.report``), or of a
sweep directory written by ``disttrain -m`` (objective against each parameter,
``disttrain.sweep.report``). The command picks by what the first directory holds."""
from __future__ import annotations

from pathlib import Path

from disttrain.observe import report as run_report
from disttrain.sweep import report as sweep_report


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-") and sweep_report.is_sweep_dir(Path(argv[0])):
        return sweep_report.main(argv)
    return run_report.main(argv)
