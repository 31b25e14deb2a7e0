"""``disttrain`` / ``python -m disttrain``: the Hydra app, plus a few sub-commands.

A sub-command's config or usage error (a mistyped key or group, a bad value) prints as one
line naming the sub-command, and exits 2, as the training command does; HYDRA_FULL_ERROR=1
shows the traceback instead. Other exceptions are bugs: they keep their traceback.
"""
from __future__ import annotations

import os
import sys

SUBCOMMANDS: dict[str, str] = {
    # name -> "module:function" taking argv (list[str]); more are registered by later features.
    "prepare-data": "disttrain.data.prepare:main",
    "plan": "disttrain.plan.cli:main",       # predicted memory/step time per strategy (issue 7)
    "report": "disttrain.cli.report:main",   # PNG pictures of run dirs (issue 7)
    "export": "disttrain.checkpoint.export:main",  # one safetensors/pt file of a checkpoint's model (issue 20)
}


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the command line or config is wrong", not "disttrain is broken":
    disttrain's ConfigError, and Hydra's and OmegaConf's composition errors."""
    from disttrain.config.errors import ConfigError
    from disttrain.config.schema import COMPOSE_ERRORS

    return (ConfigError, *COMPOSE_ERRORS)


def one_line(exc: BaseException) -> str:
    """The message on one line, worded as the training command words it (disttrain.config.schema)."""
    from disttrain.config.errors import ConfigError
    from disttrain.config.schema import explain

    text = str(exc) if isinstance(exc, ConfigError) else explain(exc)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(exc).__name__


def run_subcommand(name: str, argv: list[str]) -> int:
    import importlib

    module, func = SUBCOMMANDS[name].split(":")
    errors = usage_errors()
    try:
        return getattr(importlib.import_module(module), func)(argv)
    except errors as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"disttrain {name}: {one_line(exc)}", file=sys.stderr)
        return 2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(run_subcommand(sys.argv[1], sys.argv[2:]))
    from disttrain.cli.app import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
