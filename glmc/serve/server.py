"""uvicorn around the app: listen, serve, drain on SIGINT/SIGTERM, report how it ended.

`listen` binds the socket first (a port in use is one error line before any model is
loaded). `serve` runs the engine thread and uvicorn on this thread's event loop until a
signal or the model's failure: then uvicorn stops accepting connections, in-flight
requests get up to `drain_timeout` seconds to finish (then they are cancelled), the
engine thread ends, and the caller closes the model (stopping every rank).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from glmc.errors import GlmcError

log = logging.getLogger("glmc.serve")

ENGINE_STOP_SECONDS = 30.0  # for the engine thread to finish its step once told to stop


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "glmc"
    max_batch_rows: int = 16  # rows of the running batch: one per sample, one per beam
    max_queue: int = 64  # requests waiting to join it; more are refused with 429
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish once asked to stop
    request_timeout: float = 600.0  # seconds from a request's arrival to its last token


def max_requests_in_flight(settings: ServeSettings) -> int:
    """HTTP requests handled at once: every queued and running one, as many being read or
    refused, and a margin for /health and /metrics; more get 503."""
    return 2 * (settings.max_queue + settings.max_batch_rows) + 16


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: one the system picks)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as error:
        raise GlmcError(f"--host {host} --port {port}: cannot listen there: {error.strerror or error}") from None
    return sock


def serve(glm, settings: ServeSettings, sock: socket.socket,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `glm` on `sock` until SIGINT/SIGTERM (drained) or the model fails (GlmcError)."""
    import uvicorn

    from glmc.serve.app import AppSettings, create_app, limit_in_flight
    from glmc.serve.engine import Engine
    from glmc.serve.metrics import Metrics

    metrics = Metrics()
    engine = Engine(glm, max_rows=settings.max_batch_rows, max_queue=settings.max_queue, metrics=metrics)
    app = limit_in_flight(create_app(glm, engine, metrics, AppSettings(
        settings.model_name, settings.max_batch_rows, settings.max_body_bytes, settings.request_timeout)),
        max_requests_in_flight(settings), metrics)
    async def application(scope, receive, send) -> None:
        try:
            await app(scope, receive, send)
        except asyncio.CancelledError:
            if not server.should_exit:
                raise
            # uvicorn cut it at the end of the drain (and said so): no traceback for that
            log.warning("%s %s: cut at the end of the drain", scope.get("method", ""), scope.get("path", ""))

    config = uvicorn.Config(application, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout)),
                            # A backstop counting idle keep-alive connections too; requests meet ours first.
                            limit_concurrency=2 * max_requests_in_flight(settings),
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)

    def failed(message: str) -> None:  # from the engine thread: stop serving
        log.error("the model failed: %s", message)
        server.should_exit = True

    engine.on_failure = failed
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(url)
        await task

    engine.start()
    try:
        with _signals_recorded():
            asyncio.run(run())
    finally:
        engine.stop_accepting()
        if not engine.close(ENGINE_STOP_SECONDS):
            log.error("the engine did not stop within %g s", ENGINE_STOP_SECONDS)
        sock.close()
    if engine.failure is not None:
        raise GlmcError(engine.failure)


class _signals_recorded:
    """SIGINT and SIGTERM handled by Python while serving: uvicorn takes them over and, once it
    has drained, raises again the one it caught; it lands here, so that the caller still closes
    the model and stops every rank before the process ends."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, lambda number, frame: None)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
