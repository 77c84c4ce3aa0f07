"""uvicorn's h11 protocol with the two guards it lacks: a header timeout, and 431 (not a reset) for huge headers.

- Header timeout: from the moment a connection opens (or its previous response ends) the request line and headers
  must arrive within `header_timeout_s`; otherwise the client gets 408 and the connection closes. uvicorn's own
  keep-alive timer stops at the first byte, so a client trickling a header byte by byte would stay forever.
- Oversized headers: h11 refuses a header block over `h11_max_incomplete_event_size`; uvicorn then answers 400 and
  closes at once, and a client still sending its megabyte of headers sees a connection reset instead of the
  answer. Here the answer is 431, the write side is shut (`write_eof`), and what the client still sends is read
  and dropped for up to `_LINGER_S` seconds (a "lingering close"), so the answer arrives.
Request bodies have their own timeouts in the app (`prodcat.serve.app`), where they can be answered in JSON.
"""

from __future__ import annotations

import asyncio
from typing import Any

from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["guarded_h11_protocol"]

_LINGER_S = 2.0
_LINGER_MAX_BYTES = 16 * 1024 * 1024


def _plain_response(status: int, reason: str, text: str) -> bytes:
    body = text.encode("ascii")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; `header_timeout_s` is set by `guarded_h11_protocol`."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._timed_cycle: object = None
        self._discarded = -1  # >= 0 while lingering: bytes read and dropped after the 431

    # -- header timeout ---------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.logger.info("closed a connection whose request headers took over %.0f s", self.header_timeout_s)
            self.transport.write(_plain_response(408, "Request Timeout", "request headers took too long\n"))
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._timed_cycle:
            self._timed_cycle = self.cycle  # a request's headers are complete: its body has the app's timeouts
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        # Armed before the parent looks for a pipelined request, which cancels it again if one is complete.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    # -- oversized headers ------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._discarded >= 0:
            self._discarded += len(data)
            if self._discarded > _LINGER_MAX_BYTES:
                self.transport.close()
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this for every h11 RemoteProtocolError; a buffer over the limit is h11's "too long" one.
        pending, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        if len(pending) > limit:
            self._refuse_headers(limit)
            return
        super().send_400_response(msg)

    def _refuse_headers(self, limit: int) -> None:
        self.logger.info("refused a request whose headers are over %d bytes (431)", limit)
        self._cancel_header_timer()
        self.transport.write(
            _plain_response(431, "Request Header Fields Too Large", f"request headers are over {limit} bytes\n")
        )
        self._discarded = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)

    def eof_received(self) -> bool | None:
        if self._discarded >= 0:
            self.transport.close()
        return None


def guarded_h11_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to pass as uvicorn's `http=`, with this header timeout."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
