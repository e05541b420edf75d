"""What stands in front of the routes: the API key on /v1 and the request-body limit, as plain ASGI
middleware so that an oversized body is refused while it arrives, before FastAPI reads it whole."""

from __future__ import annotations

import hmac
import json

from .protocol import ErrorBody, ErrorResponse

DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # a context of 100k+ tokens of JSON-escaped text fits


async def send_error(send, status: int, error: ErrorBody, headers: tuple = ()) -> None:
    body = json.dumps(ErrorResponse(error=error).model_dump()).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class Guard:
    """api_key: required as `Authorization: Bearer KEY` on every /v1 route (OpenAI's 401 otherwise);
    None leaves them open. max_body_bytes: a larger request body is a 413, declared or streamed."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(headers):
            error = ErrorBody(
                message="missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
            return await send_error(send, 401, error, ((b"www-authenticate", b"Bearer"),))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await send_error(send, 413, self._too_large())
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # A body without a declared length (chunked) is read here, up to the limit, then replayed.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                chunks.append(message.get("body", b""))
                size, more = size + len(chunks[-1]), message.get("more_body", False)
                if size > self.max_body_bytes:
                    return await send_error(send, 413, self._too_large())
            receive = _replay(b"".join(chunks), receive)
        return await self.app(scope, receive, send)

    def _authorized(self, headers: dict) -> bool:
        return hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode())

    def _too_large(self) -> ErrorBody:
        return ErrorBody(
            message=f"the request body is larger than this server's limit of {self.max_body_bytes:,} bytes "
            "(tiermoe serve --max-request-mib)",
            type="invalid_request_error",
        )


def _replay(body: bytes, receive):
    """A receive that gives `body` once, then whatever the client sends next (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
