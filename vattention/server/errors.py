"""OpenAI-style errors: every 4xx/5xx the server sends has the body

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

Invariants: `APIError` is the only exception the HTTP layer turns into an error response on
purpose (anything else is a 500 with a generic message: internals are never echoed); `type`
follows OpenAI's vocabulary ("invalid_request_error" for 4xx, "server_error" for 5xx);
`param` names the offending request field where there is one.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body with `status`."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, HTTPStatus.BAD_REQUEST, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    """A parameter that this server does not implement (set to a non-default value)."""
    more = f": {detail}" if detail else ""
    return APIError(
        f"'{param}' is not supported by this server{more}",
        HTTPStatus.BAD_REQUEST,
        param=param,
        code="unsupported_parameter",
    )
