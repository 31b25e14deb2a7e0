"""``disttrain`` / ``python -m disttrain``: the Hydra app, plus a few sub-commands."""
from __future__ import annotations

import sys

SUBCOMMANDS: dict[str, str] = {
    # name -> "module:function" taking argv (list[str]); more are registered by later features.
    "prepare-data": "disttrain.data.prepare:main",
    "plan": "disttrain.plan:main",       # predicted memory/step time per strategy (issue 7)
    "report": "disttrain.report:main",   # PNG pictures of run dirs (issue 7)
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        module, func = SUBCOMMANDS[sys.argv[1]].split(":")
        sys.exit(getattr(importlib.import_module(module), func)(sys.argv[2:]))
    from disttrain.app import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
