"""Owns one request's images in the served model: the row count, every row's payload checked against the serving
limits before any row is decoded, a process-wide cap on decodes running at once, the request's deadline, and
errors that name the row (no stack trace, no server path).

MLflow's scoring server runs each request in a thread and answers 504 when its timeout passes, but the thread
runs on; a burst of bombs would otherwise decode side by side. Here at most `max_concurrent_decodes` decode at
once, and a request stops decoding once the server's timeout has passed (its client has had the 504).
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from pathlib import Path

import numpy as np

from mmkd.serving.inputs import kind_of
from mmkd.serving.limits import InputError, TooLarge, check_payload, size_text

TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # set by `mlflow models serve` for the server it starts
MAX_NAMED = 10  # a refusal names at most this many bad rows


class RequestError(Exception):
    """A request refused: `status` (400 bad input, 413 too large, 504 past the deadline) and a message naming the
    rows and the reasons."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def deadline_from_env() -> float | None:
    """When the request's work should stop (monotonic clock): the scoring server's timeout from now; None when
    the model is not behind `mlflow models serve`."""
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return None
    return time.monotonic() + timeout


class DecodeGate:
    """One per loaded model (so per server process): the limits and the decode slots all requests share."""

    def __init__(self, limits):
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent_decodes)

    def check_rows(self, n: int) -> None:
        if n > self.limits.max_rows:
            raise RequestError(f"too large: the request has {n} rows > serving.max_rows {self.limits.max_rows}", 413)

    def check_texts(self, texts: dict[int, str]) -> None:
        long = [(row, len(t)) for row, t in texts.items() if len(t) > self.limits.max_text_chars]
        if long:
            raise RequestError("; ".join(f"row {row}: too large: text of {n} characters > serving.max_text_chars "
                                         f"{self.limits.max_text_chars}" for row, n in long[:MAX_NAMED]), 413)

    def images(self, payloads: dict[int, str], decode, deadline: float | None = None) -> dict[int, np.ndarray]:
        """{row: base64 payload} -> {row: decode(bytes, name)}; every row's size and header are checked first,
        so a request with a bomb in its last row decodes nothing."""
        problems: list[tuple[int, InputError]] = []
        for row, b64 in payloads.items():
            try:
                self._check(row, b64)
            except InputError as exc:
                problems.append((row, exc))
        if problems:
            raise _refusal(problems)
        out = {}
        for row, b64 in payloads.items():
            out[row] = self._decode(row, b64, decode, deadline)
        return out

    def _check(self, row: int, b64: str) -> None:
        # base64 holds 3 bytes per 4 characters: a payload over the byte limit is refused before it is decoded
        n = len(b64) * 3 // 4 - b64.endswith("=") - b64.endswith("==")
        if n > self.limits.max_image_bytes:
            raise TooLarge(f"too large: about {size_text(n)} of base64 payload > "
                           f"serving.max_image_bytes {size_text(self.limits.max_image_bytes)}")
        data = _b64(b64)
        check_payload(data, kind_of(Path("input"), data[:2048]), self.limits)

    def _decode(self, row: int, b64: str, decode, deadline: float | None) -> np.ndarray:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._slots.acquire(timeout=wait):
            raise RequestError(f"row {row}: not decoded: the request passed the server's timeout waiting for a "
                               "decode slot", 504)
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestError(f"row {row}: not decoded: the request passed the server's timeout", 504)
            return decode(_b64(b64), f"row {row}")
        except InputError as exc:  # the message already starts with the row
            raise RequestError(str(exc), 413 if isinstance(exc, TooLarge) else 400) from None
        finally:
            self._slots.release()


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"not base64: {exc}") from None


def _refusal(problems: list[tuple[int, InputError]]) -> RequestError:
    """One error for every bad row (the first MAX_NAMED named): 413 when each is too large, else 400."""
    named = "; ".join(f"row {row}: {exc}" for row, exc in problems[:MAX_NAMED])
    more = f"; and {len(problems) - MAX_NAMED} more bad rows" if len(problems) > MAX_NAMED else ""
    status = 413 if all(isinstance(exc, TooLarge) for _, exc in problems) else 400
    return RequestError(named + more, status)
