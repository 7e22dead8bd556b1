"""One error hierarchy for the HTTP edge, rendered in OpenAI's envelope.

Every error the gateway returns has the body ``{"error": {"message", "type", "param", "code"}}`` and the
status the official ``openai`` SDK maps to the right exception class:

=====  ==========================  =====================================================
 400   invalid_request_error       ``BadRequestError`` (bad params, out_of_domain, unsafe_content,
                                   context_length_exceeded, tools_not_supported)
 401   authentication_error        ``AuthenticationError``
 403   permission_error            ``PermissionDeniedError`` (model not in the key's allow list)
 404   invalid_request_error       ``NotFoundError`` (code ``model_not_found``)
 408   invalid_request_error       ``APIStatusError`` (the body did not arrive within limits.body_read_timeout_s)
 413   invalid_request_error       ``APIStatusError`` (status 413, body too large)
 431   invalid_request_error       ``APIStatusError`` (headers over limits.max_header_bytes)
 429   rate_limit_error            ``RateLimitError``
 502   upstream_error              ``InternalServerError`` (backend failed, not retryable here)
 503   service_unavailable         ``InternalServerError`` (code ``no_healthy_replica``)
 504   timeout                     ``InternalServerError`` (limits.request_timeout_s passed)
=====  ==========================  =====================================================

5xx bodies from backends carry a stable message naming the pool and the code, never an upstream address
or exception text (those go to the log); a backend's own 4xx message is passed on.
"""

from __future__ import annotations

import json
import logging
from typing import Any


class GatewayError(Exception):
    """An error with an HTTP status and an OpenAI error body. Subclasses fix status and type."""

    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class PolicyRejection(InvalidRequest):
    """The guard said out-of-domain (code ``out_of_domain``) or unsafe (code ``unsafe_content``)."""


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class RequestTimeout(GatewayError):
    status_code = 408
    error_type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class HeadersTooLarge(GatewayError):
    status_code = 431
    error_type = "invalid_request_error"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class UpstreamFailed(GatewayError):
    status_code = 502
    error_type = "upstream_error"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"


class DeadlineExceeded(GatewayError):
    status_code = 504
    error_type = "timeout"


class ClientGone(Exception):
    """The client disconnected before its answer was complete (logged as 499, nothing is sent)."""


_SERVER_SIDE = {502: "its backend failed", 503: "it has no healthy replica", 504: "its backend did not answer in time"}


def from_backend_error(err: Any, pool: str | None = None) -> GatewayError:
    """Map a ``backends.base.BackendError`` to the gateway error with the same status and code.

    For 5xx the message is stable (pool and code only) and the backend's detail is logged at warning."""
    status = int(getattr(err, "status_code", 502) or 502)
    code = getattr(err, "code", None)
    message = getattr(err, "message", str(err))
    if status >= 500:
        logging.getLogger("switchyard").warning("pool %s: %s (%s): %s", pool or "-", status, code, message)
        what = _SERVER_SIDE.get(status, "its backend failed")
        message = f"Pool {pool!r} could not answer: {what} ({code or 'upstream_error'})." if pool else \
            f"The request could not be answered: {what} ({code or 'upstream_error'})."
    # An upstream 401/403 is the gateway's credential problem, not the caller's: it stays a 502.
    param = getattr(err, "param", None) if status < 500 else None
    for cls in (InvalidRequest, NotFound, PayloadTooLarge, RateLimited, ServiceUnavailable, DeadlineExceeded):
        if cls.status_code == status:
            return cls(message, code=code, param=param)
    if 400 <= status < 500:
        return InvalidRequest(message, code=code, param=param)
    return UpstreamFailed(message, code=code or "upstream_error")
