"""The command line: the Hydra training app (``app``); sub-commands are listed in ``disttrain.__main__``."""
