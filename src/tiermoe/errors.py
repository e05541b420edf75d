"""Exception types. Each message says what is wrong and what to do; the CLI prints it on one line and
the server maps it to an OpenAI error object with the HTTP status given here."""


class TiermoeError(Exception):
    """Base class: a user-facing error with a clear message."""

    http_status = 500
    error_type = "server_error"


class CheckpointError(TiermoeError):
    """The checkpoint directory is missing, truncated, or holds tensors of the wrong shape."""

    http_status = 500


class UnsupportedArchitectureError(TiermoeError):
    """config.json names an architecture tiermoe does not implement."""

    http_status = 400
    error_type = "invalid_request_error"


class InvalidRequestError(TiermoeError):
    """A request the engine cannot serve as asked (empty prompt, too long, bad sampling values)."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BudgetError(TiermoeError):
    """A memory budget too small to run the model."""

    http_status = 500
