"""Owns the one rule for which failures are transient (worth a retry after a pause) and which are not."""

from __future__ import annotations

import errno
import sqlite3

# errors of the network or of a busy resource: the same call may succeed a little later
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN, errno.EBUSY}
# MLflow's error codes for a server that is overloaded or briefly unavailable
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# exception class names from libraries not imported here (requests, urllib3, botocore, httpx)
_TRANSIENT_NAMES = {"ConnectTimeout", "ReadTimeout", "ConnectTimeoutError", "ReadTimeoutError",
                    "NewConnectionError", "MaxRetryError", "ProtocolError", "RemoteDisconnected",
                    "EndpointConnectionError", "ConnectionClosedError", "ConnectError", "RemoteProtocolError"}


def _one(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    code = getattr(exc, "error_code", None)
    if code in _TRANSIENT_MLFLOW_CODES:
        return True
    status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and status in (429, 502, 503, 504)


def is_transient(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from, is a network, overload or lock failure.

    Everything else (bad parameters, bad data, a bug, out of memory) fails at once: a retry would only fail again.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _one(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
