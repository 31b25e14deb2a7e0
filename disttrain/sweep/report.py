"""``disttrain report <sweep dir>``: one PNG per swept parameter, the trials' objective
against that parameter's value (best trial ringed, failed trials drawn at the top edge).

Reads the trials' ``result.json`` files (the same source as summary.csv) and rewrites
summary.csv, so a sweep interrupted before its end-of-sweep callback still gets both.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from disttrain.sweep import job as sweep


def is_sweep_dir(path: Path) -> bool:
    """A directory holding trials' result.json files (what ``disttrain -m`` writes)."""
    return path.is_dir() and (any(path.glob(f"*/{sweep.RESULT_FILE}")) or (path / "summary.csv").exists())


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _x_values(values: list[str]) -> tuple[list[float], list[str] | None]:
    """Numeric values as they are; anything else as categories (positions 0..k-1)."""
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers):
        return numbers, None  # type: ignore[return-value]
    categories = sorted(set(values))
    return [float(categories.index(v)) for v in values], categories


def plot_parameter(rows: list[dict], key: str, best: dict | None, out: Path) -> Path:
    """Scatter objective vs ``key``; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    values = [sweep._params(r.get("overrides", [])).get(key, "") for r in rows]
    xs, categories = _x_values(values)
    ok = [(x, r) for x, r in zip(xs, rows) if r.get("objective") is not None and math.isfinite(r["objective"])]
    bad = [(x, r) for x, r in zip(xs, rows) if (x, r) not in ok]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for status, marker in (("ok", "o"), ("pruned", "s")):
        pts = [(x, r["objective"]) for x, r in ok if r.get("status") == status]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=f"{status} ({len(pts)})")
    if bad:
        top = max([r["objective"] for _, r in ok], default=1.0) * 1.1  # above every finished trial
        ax.scatter([x for x, _ in bad], [top] * len(bad), marker="x", color="red", label=f"failed ({len(bad)})")
    if best is not None and best in [r for _, r in ok]:
        bx = xs[rows.index(best)]
        ax.scatter([bx], [best["objective"]], s=200, facecolors="none", edgecolors="black", label="best")
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    elif ok and min(x for x, _ in ok) > 0 and max(xs) / max(min(xs), 1e-300) > 20:
        ax.set_xscale("log")  # learning rates and the like span decades
    ax.set_xlabel(key)
    ax.set_ylabel(f"objective ({(best or {}).get('objective_metric', 'objective')})")
    ax.set_title(f"objective vs {key} ({len(rows)} trials)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"objective_vs_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def report(sweep_dir: Path, direction: str = "minimize", out: Path | None = None) -> list[Path]:
    """Write summary.csv again and one PNG per swept parameter; return the PNG paths."""
    rows, best = sweep.write_summary(sweep_dir, direction)
    if not rows:
        raise SystemExit(f"disttrain report: no trial results (*/{sweep.RESULT_FILE}) under {sweep_dir}")
    out = out or sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    return [plot_parameter(rows, key, best, out) for key in sweep.swept_keys(rows)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="disttrain report", description="Plots of a sweep directory.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--direction", default="minimize", choices=sweep.DIRECTIONS)
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default <sweep dir>/report)")
    args = parser.parse_args(argv)
    paths = report(args.sweep_dir, args.direction, args.out)
    rows = sweep.collect(args.sweep_dir)
    best = sweep.best_trial(rows, args.direction)
    sweep.print_table(rows, best, args.sweep_dir)
    for path in paths:
        print(f"wrote {path}")
    return 0
