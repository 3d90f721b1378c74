"""A small token-guarded HTTP API over the StreamRegistry, for tools that register streams (stdlib http.server)."""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.registry import SpecError, StreamRegistry
from pipeline.transport import REDIS_DOWN

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class StreamsApi:
    """Routes: GET /health, GET /streams, GET|PUT|PATCH|DELETE /streams/{id}, POST /streams. Bearer token on all."""

    def __init__(self, registry: StreamRegistry, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        if not token:
            raise ValueError("the HTTP API needs a token (set VALORA_API__TOKEN or api.token)")
        self.registry = registry
        self.token = token
        self.server = ThreadingHTTPServer((host, port), self._handler_class())
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StreamsApi:
        self.thread = threading.Thread(target=self.server.serve_forever, name="streams-api", daemon=True)
        self.thread.start()
        logger.info("streams API at %s", self.url)
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, method: str, path: str, auth: str | None, body: bytes) -> tuple[HTTPStatus, Any]:
        if not auth or not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
        parts = [p for p in path.split("?", 1)[0].split("/") if p]
        if parts == ["health"] and method == "GET":
            return HTTPStatus.OK, {"ok": True}
        if not parts or parts[0] != "streams" or len(parts) > 2:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")
        stream_id = parts[1] if len(parts) == 2 else None
        if stream_id is None and method == "GET":
            return HTTPStatus.OK, [json.loads(r.model_dump_json()) for r in self.registry.records()]
        if stream_id is None and method == "POST":
            return HTTPStatus.CREATED, self.registry.add(_json(body)).model_dump(mode="json")
        if stream_id is None:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on /streams")
        if method == "GET":
            health = self.registry.health(stream_id)
            return HTTPStatus.OK, {"spec": self.registry.get(stream_id).model_dump(mode="json"),
                                   "error": self.registry.error(stream_id),
                                   "health": health.model_dump(mode="json") if health else None}
        if method == "PUT":
            return HTTPStatus.OK, self.registry.add(_json(body) | {"id": stream_id}, replace=True).model_dump(
                mode="json")
        if method == "PATCH":
            return HTTPStatus.OK, self.registry.update(stream_id, _json(body)).model_dump(mode="json")
        if method == "DELETE":
            try:
                self.registry.remove(stream_id)
            except KeyError:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no stream {stream_id!r} is registered") from None
            return HTTPStatus.OK, {"removed": stream_id}
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on /streams/{stream_id}")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "valora-api"

            def _serve(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
                    body = self.rfile.read(length) if length else b""
                    status, payload = api.handle(self.command, self.path, self.headers.get("Authorization"), body)
                except ApiError as exc:
                    status, payload = exc.status, {"error": str(exc)}
                except SpecError as exc:
                    missing = str(exc).startswith("no stream")
                    status, payload = (HTTPStatus.NOT_FOUND if missing else HTTPStatus.BAD_REQUEST), {"error": str(exc)}
                except REDIS_DOWN as exc:
                    status, payload = HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"Redis unavailable: {exc}"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, fmt: str, *args) -> None:
                logger.debug("api: " + fmt, *args)

        return Handler


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object (a stream spec)")
    return data
