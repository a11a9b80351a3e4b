"""BodySizeLimit: the largest request body, enforced before anything parses it (413 past it).

A pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the
handlers): it refuses a too-large Content-Length at once and counts the bytes of a body
sent without one, stopping as soon as they pass the limit.
"""

from __future__ import annotations

import json


class _BodyTooLarge(BaseException):
    """A BaseException, so FastAPI's body parsing (which turns any Exception into a 400)
    lets it through to this middleware."""


class BodySizeLimit:
    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self._reject(send, 400, "The Content-Length header is not a number.")
                return
            if declared > self.max_bytes:
                await self._reject(send, 413, self._too_large(declared))
                return
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, 413, self._too_large(received))

    def _too_large(self, size: int) -> str:
        return (f"The request body ({size} bytes so far) exceeds this server's limit of {self.max_bytes} bytes "
                "(--max-request-body-bytes).")

    @staticmethod
    async def _reject(send, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": status}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
