"""`glmc serve`: the model behind an OpenAI-compatible HTTP endpoint, with continuous batching."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import click

from glmc.cli import cli
from glmc.cli.model_options import model_options, open_model
from glmc.cli.types import finite

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@cli.command(context_settings={"show_default": True})
@model_options
@click.option("--host", default="127.0.0.1",
              help="Address to listen on (0.0.0.0: every interface; the server has no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="Port to listen on (0: one the system "
              "picks; the line printed once serving names it).")
@click.option("--served-model-name", metavar="NAME",
              help="The model's id in /v1/models and in requests' `model`. Default: the checkpoint's or "
                   "package's folder name, glmc-default for the embedded model.", show_default=False)
@click.option("--max-batch-rows", type=click.IntRange(1, 4096), default=16,
              help="Rows the running batch may hold: one per sampled choice, one per beam.")
@click.option("--max-queue", type=click.IntRange(1, 1 << 16), default=64,
              help="Requests waiting to join the batch; beyond them requests get 429 with Retry-After.")
@click.option("--max-body-bytes", type=click.IntRange(1024, 1 << 30), default=1 << 20,
              help="Largest request body accepted (413 beyond).")
@click.option("--drain-timeout", type=finite(0, 3600), default=30.0,
              help="Seconds in-flight requests get to finish after Ctrl-C or SIGTERM, before they are cancelled "
                   "and every rank stops.")
@click.option("--request-timeout", type=finite(1, 86400), default=600.0,
              help="Seconds a request may take from its arrival to its last token (504 beyond).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="info: one line per request refused, and the start and stop; debug: uvicorn's too.")
def serve(model, host, port, served_model_name, max_batch_rows, max_queue, max_body_bytes, drain_timeout,
          request_timeout, log_level):
    """Serve the model over HTTP: OpenAI's completions API, and GLM's own generation.

    \b
    Endpoints:
      POST /v1/completions  OpenAI completions (prompt, max_tokens, temperature, top_p, top_k,
                            n, stop, seed, stream); a prompt without a mask gets [gMASK]
      POST /v1/generate     GLM's blank filling, as `glmc run`: every [MASK]/[sMASK]/[gMASK],
                            sampling or beam search, every beam
      GET  /v1/models       the served model
      GET  /health          200 while the engine and every rank are alive, else 503
      GET  /metrics         Prometheus: requests, tokens, queue depth, batch rows, latencies

    Requests join the running batch between its steps and leave it when done or when their
    client disconnects. The model options are `glmc run`'s; with --tp N this process serves
    and runs rank 0, and the other ranks run as they do for `glmc run`.

    \b
    Examples:
      glmc serve --port 8000
      glmc serve --package PKG --backend onnxruntime --max-batch-rows 32
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "glmc-default", "prompt": "The best way to learn is", "max_tokens": 16}'
    """
    from glmc.serve.server import ServeSettings, listen
    from glmc.serve.server import serve as run_server

    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("uvicorn").setLevel(logging.DEBUG if log_level == "debug" else logging.WARNING)
    name = served_model_name or (Path(model.source).resolve().name if model.source else "glmc-default")
    settings = ServeSettings(host, port, name, max_batch_rows, max_queue, max_body_bytes, drain_timeout,
                             request_timeout)
    sock = listen(host, port)  # before the model loads: a port in use is refused at once
    try:
        # The engines of backends that size them (TensorRT) take the batch's rows.
        glm = open_model(replace(model, spec=replace(model.spec, max_batch_size=max_batch_rows)))
    except BaseException:
        sock.close()
        raise
    if glm is None:  # a torchrun rank other than 0: it served rank 0 until the end
        sock.close()
        return
    with glm, _draining():
        run_server(glm, settings, sock, on_ready=lambda url: click.echo(
            f"glmc: serving {name} at {url} (Ctrl-C or SIGTERM drains for up to {drain_timeout:g} s, then stops)",
            err=True))
    click.echo("glmc: stopped", err=True)


class _draining:
    """While serving, Ctrl-C drains the requests in flight (uvicorn handles it) instead of ending
    glmc within a second: the interrupt watchdog's wakeup descriptor is set aside meanwhile."""

    def __enter__(self):
        self.previous = -1
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.set_wakeup_fd(-1)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous != -1:
            signal.set_wakeup_fd(self.previous, warn_on_full_buffer=False)
