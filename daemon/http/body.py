"""A request body read under limits: a size cap and a deadline that needs steady progress.

uvicorn reads bodies for as long as a client cares to send them. Here a body larger than
`[http] max_body_mb` is refused with 413 (from its Content-Length before a byte is read,
or as soon as a chunked body passes the cap), and one that stalls for `body_timeout`, or
falls below `body_min_rate_kb` KiB/s once `body_timeout` has passed, with 408.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request

from daemon.config import HttpSettings
from daemon.http.auth import HttpRefusal

# Bytes handed on at a time: worker-thread hops stay few, memory stays bounded.
BATCH_BYTES = 1 << 20
CLOSE = {"Connection": "close"}


class BodyLimits:
    """The size cap and progress deadline for one request's body."""

    def __init__(self, http: HttpSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = http.max_body_mb * 2**20
        self.idle = http.body_timeout
        self.rate = http.body_min_rate_kb * 1024
        self._clock = clock

    def check_declared(self, request: Request) -> None:
        """413 at once when the declared Content-Length is over the cap."""
        declared = request.headers.get("content-length")
        if declared is None:
            return
        try:
            length = int(declared)
        except ValueError:
            raise HttpRefusal(400, "Content-Length is not a number", CLOSE) from None
        if length > self.max_bytes:
            raise self._too_large(length)

    def _too_large(self, length: int) -> HttpRefusal:
        return HttpRefusal(
            413,
            f"body of {length} bytes or more is over max_body_mb ({self.max_bytes // 2**20})",
            CLOSE,
        )

    async def read(self, request: Request) -> AsyncIterator[bytes]:
        """The body in batches of up to `BATCH_BYTES`, under the cap and the deadline."""
        start = self._clock()
        received = 0
        batch: list[bytes] = []
        size = 0
        chunks = request.stream().__aiter__()
        while True:
            elapsed = self._clock() - start
            budget = self.idle
            if self.rate:
                budget = min(budget, self.idle + received / self.rate - elapsed)
            if budget <= 0:
                raise self._too_slow(received, elapsed)
            try:
                async with asyncio.timeout(budget):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise self._too_slow(received, self._clock() - start) from None
            received += len(chunk)
            if received > self.max_bytes:
                raise self._too_large(received)
            batch.append(chunk)
            size += len(chunk)
            if size >= BATCH_BYTES:
                yield b"".join(batch)
                batch, size = [], 0
        if batch:
            yield b"".join(batch)

    def _too_slow(self, received: int, elapsed: float) -> HttpRefusal:
        return HttpRefusal(
            408,
            f"body too slow: {received} bytes in {elapsed:.1f} s (body_timeout, body_min_rate_kb)",
            CLOSE,
        )
