"""The error for a launcher environment that is missing or inconsistent (imports nothing)."""


class LauncherEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""
