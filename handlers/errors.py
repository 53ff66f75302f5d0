"""The errors a handler raises, each meaning one status; protocols render them in their own shape."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error that is the client's or the server's state, not a bug."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(ServingError):
    """The request is malformed or asks for something the model cannot do."""

    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ServingError):
    status_code = 404
    error_type = "not_found_error"

    def __init__(self, name: str) -> None:
        # KServe's exact wording, which clients may match on.
        super().__init__(f"Model with name {name} does not exist.")


class Unauthorized(ServingError):
    """No or a wrong API key (`api_key`)."""

    status_code = 401
    error_type = "authentication_error"


class PayloadTooLarge(ServingError):
    """A request over a size limit: its body (or decompressed body), inputs per request or characters per input.
    The message names the limit's argument."""

    status_code = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(ServingError):
    status_code = 415
    error_type = "invalid_request_error"


class Overloaded(ServingError):
    status_code = 429
    error_type = "overloaded_error"


class ResponseTimeout(ServingError):
    """No response started within the server's timeout (`traffic.timeout`); the handler was cancelled."""

    status_code = 504
    error_type = "timeout_error"


class NotReady(ServingError):
    status_code = 503
    error_type = "service_unavailable"

    @classmethod
    def for_model(cls, model_name: str, load_error: str | None) -> NotReady:
        if load_error:
            return cls(f"model '{model_name}' failed to load: {load_error}")
        return cls(f"model '{model_name}' is still loading; retry shortly")
