"""One exception type for bad user input; entry points print it as a single line and exit 2."""


class ConfigError(ValueError):
    """A user-facing configuration or input error. The message names the offending field or path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
