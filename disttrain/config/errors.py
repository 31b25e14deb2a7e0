"""The one exception for a wrong setting. It imports nothing, so every layer can raise it."""


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""
