"""OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.

The OpenAI SDK turns the status into its exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 409 ConflictError, 429 RateLimitError, 500 InternalServerError).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the client gets in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(what: str, ident: str, *, param: str | None = None) -> ApiError:
    # The same answer for "does not exist" and "belongs to another tenant": ids do not leak.
    return ApiError(
        404, f"No such {what}: {ident!r}", param=param, code=f"{what.replace(' ', '_')}_not_found"
    )


def unauthorized(message: str = "Incorrect API key provided.") -> ApiError:
    return ApiError(401, message, type="invalid_request_error", code="invalid_api_key")


def quota_exceeded(message: str) -> ApiError:
    return ApiError(429, message, type="rate_limit_error", code="quota_exceeded")
