"""Configuration: the typed sections (``schema``), the one error type (``errors``), the
run-id resolver and config directory (``resolvers``) and the generic checks (``validate``).
Importing the package imports nothing else, so the lowest layers can raise ConfigError."""
