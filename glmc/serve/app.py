"""The HTTP routes, on FastAPI: OpenAI's completions, GLM's generate, models, health, metrics.

A request is read with a bounded body (413 beyond it), parsed strictly, checked against
the model (400 with OpenAI's error JSON and one log line), tokenized, and handed to the
engine as a job (429 with Retry-After when the queue is full). Its tokens come back
through the job's events, which the engine thread puts on this request's asyncio queue;
every wait for them has a timeout, and a client that disconnects has its job cancelled
(its rows leave the batch at the next step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glmc.errors import GlmcError
from glmc.fileio import parse_json
from glmc.generation.filling import Filled, Prompt
from glmc.generation.strategies import new_generator
from glmc.serve import protocol
from glmc.serve.engine import DONE, ERROR, TOKEN, Engine, Job, Overloaded, Stopped
from glmc.serve.metrics import Metrics
from glmc.serve.protocol import ApiError, ModelLimits, bad
from glmc.serve.text import TextStream

log = logging.getLogger("glmc.serve")

POLL_SECONDS = 0.25  # a request waiting for tokens looks at its client this often
RETRY_AFTER_SECONDS = 1
ENDPOINTS = ("/v1/completions", "/v1/generate", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class AppSettings:
    model_name: str
    max_batch_rows: int
    max_body_bytes: int
    request_timeout: float  # seconds from a request's arrival to its last token


class TimedStreamingResponse(StreamingResponse):
    """A stream whose every send must complete within `send_timeout` seconds: a client that
    stops reading does not hold its handler (and the drain) forever."""

    def __init__(self, content, send_timeout: float, **kwargs):
        super().__init__(content, **kwargs)
        self.send_timeout = send_timeout

    async def __call__(self, scope, receive, send):
        async def timed_send(message):
            await asyncio.wait_for(send(message), self.send_timeout)

        try:
            await super().__call__(scope, receive, timed_send)
        except asyncio.TimeoutError:  # the stream's generator is closed: its finally frees the rows
            log.warning("a streaming client read nothing for %g s: its stream is cut", self.send_timeout)


class Disconnected(Exception):
    pass


@dataclass
class _Watch:
    """When a request last looked at its client."""

    checked_at: float = field(default_factory=time.monotonic)


def create_app(glm, engine: Engine, metrics: Metrics, settings: AppSettings) -> FastAPI:
    app = FastAPI(title="glmc", docs_url=None, redoc_url=None, openapi_url=None)
    limits = ModelLimits(settings.model_name, glm.config.max_sequence_length, glm.config.vocab_size,
                         settings.max_batch_rows, glm.tokenizer is not None)
    created = protocol.now()
    service = _Service(glm, engine, metrics, settings, limits)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error_response(request, ApiError(error.status_code, str(error.detail), kind), metrics)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(request, ApiError(500, f"internal error: {type(error).__name__}", "server_error"),
                               metrics)

    async def answer(request: Request, handle):
        try:
            return await handle(request)
        except ApiError as error:
            return _error_response(request, error, metrics)
        except Disconnected:  # the client left before its request was read: nobody to answer
            return Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, service.completions)

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await answer(request, service.generate)

    @app.get("/v1/models")
    async def models():
        return protocol.model_list(settings.model_name, created, glm.config.max_sequence_length)

    @app.get("/health")
    async def health():
        cluster = getattr(glm, "cluster", None)
        failure = engine.failure or (cluster.failure if cluster is not None else None)
        if failure is not None:
            return JSONResponse({"status": "failed", "error": failure}, status_code=503)
        if not engine.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok", "model": settings.model_name, "max_batch_rows": settings.max_batch_rows,
                **engine.state}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def limit_in_flight(app, limit: int, metrics: Metrics):
    """`app` handling at most `limit` HTTP requests at once (running, queued, being read or
    answered): beyond, 503 with OpenAI's error JSON and Retry-After, before any work. The
    queue's 429 comes first in practice; this bounds what slow clients (a body that never
    arrives, a stream read slowly) can hold. uvicorn's own limit would answer in plain text."""
    in_flight = 0

    async def limited(scope, receive, send) -> None:
        nonlocal in_flight
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if in_flight >= limit:
            error = ApiError(503, f"the server is handling {limit} requests, as many as it takes; retry later",
                             "server_error", None, "server_busy", {"Retry-After": str(RETRY_AFTER_SECONDS)})
            response = _error_response(Request(scope), error, metrics, outcome="overloaded")
            await response(scope, receive, send)
            return
        in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight -= 1

    return limited


def endpoint_label(path: str) -> str:
    """The metrics' endpoint: a served route, else "other" (a label per unknown path a client
    makes up would grow the metrics without bound)."""
    return path if path in ENDPOINTS else "other"


def _error_response(request: Request, error: ApiError, metrics: Metrics, outcome: str | None = None) -> JSONResponse:
    """OpenAI's error JSON, counted under `outcome` (default: from the status) and logged in one line."""
    outcome = outcome or {400: "bad_request", 404: "bad_request", 413: "bad_request", 429: "overloaded"}.get(
        error.status, "error" if error.status >= 500 else "bad_request")
    metrics.requests.labels(endpoint_label(request.url.path), outcome).inc()
    log.warning("%d %s %s: %s", error.status, request.method, request.url.path, error.message)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _read_json(request: Request, limit: int, timeout: float):
    """The body as strict JSON, at most `limit` bytes, read within `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, f"the request body is larger than {limit} bytes", "invalid_request_error")

    async def read() -> bytes:
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body is larger than {limit} bytes", "invalid_request_error")
                chunks.append(chunk)
        except ClientDisconnect:  # the client left while sending
            raise Disconnected() from None
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("We could not parse the JSON body of your request: it is not UTF-8") from None
    try:
        return parse_json(text, "the request body")
    except GlmcError as error:
        raise bad(f"We could not parse the JSON body of your request. ({error})") from None


@dataclass
class _Choice:
    """One choice of a completion as its tokens come."""

    stream: TextStream
    tokens: list[int] = field(default_factory=list)  # the blank so far, end tokens left out
    finish_reason: str | None = None
    last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Service:
    def __init__(self, glm, engine: Engine, metrics: Metrics, settings: AppSettings, limits: ModelLimits):
        self.glm, self.engine, self.metrics, self.settings, self.limits = glm, engine, metrics, settings, limits
        self.special = glm.special_tokens()
        self.end_tokens = set(self.special.end_tokens)

    # --- shared -------------------------------------------------------------------------------
    def _prompt(self, prompt: str | tuple[int, ...]) -> Prompt:
        if isinstance(prompt, str) and self.glm.tokenizer is None:
            raise bad("this model has no tokenizer: give the prompt as token ids", "prompt")
        try:
            return self.glm.prompt(prompt if isinstance(prompt, str) else list(prompt))
        except GlmcError as error:
            raise bad(str(error), "prompt") from None

    def _decode(self, ids: list[int]) -> str:
        """A blank's text; without a tokenizer its ids in decimal, as `glmc run` prints them."""
        if self.glm.tokenizer is None:
            return " ".join(map(str, ids))
        return self.glm.tokenizer.detokenize(ids)

    def _submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except Overloaded:
            raise ApiError(429, "the server's queue is full; retry later", "rate_limit_error", None,
                           "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except Stopped as error:
            raise ApiError(503, f"the server does not take requests: {error}", "server_error") from None

    def _channel(self) -> tuple[asyncio.Queue, callable]:
        """A queue of this request's events, and the thread-safe function the engine puts them with."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server has stopped, nobody listens
                pass
        return events, emit

    async def _next(self, request: Request, events: asyncio.Queue, deadline: float, watch: "_Watch") -> tuple:
        """The next event, looking at the client every POLL_SECONDS (a request whose client left
        raises Disconnected) and at the deadline."""
        while True:
            now = time.monotonic()
            if now - watch.checked_at >= POLL_SECONDS:
                watch.checked_at = now
                if await request.is_disconnected():
                    raise Disconnected()
            left = deadline - now
            if left <= 0:
                raise ApiError(504, f"the request did not finish within {self.settings.request_timeout:g} s "
                                    "(--request-timeout)", "server_error")
            try:
                return await asyncio.wait_for(events.get(), min(POLL_SECONDS, left))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                pass

    @staticmethod
    def _engine_error(event: tuple) -> ApiError:
        _, status, message, kind = event
        return ApiError(status, message, kind)

    # --- /v1/completions ----------------------------------------------------------------------
    async def completions(self, request: Request):
        arrived = time.monotonic()
        body = await _read_json(request, self.settings.max_body_bytes, self.settings.request_timeout)
        req = protocol.parse_completion(body, self.limits)
        prompts = [self._prompt(p) for p in req.prompts]
        limit = self.limits.max_sequence_length
        for prompt in prompts:
            masks = sum(prompt.ids.count(m) for m in (self.special.mask, self.special.smask, self.special.gmask))
            if masks > 1:
                raise bad("a completion fills one mask; this prompt has several (POST /v1/generate fills them "
                          "all)", "prompt")
            context = len(prompt.ids) + 1  # with sop
            if context >= limit:
                raise bad(f"This model's maximum context length is {limit} tokens; the prompt takes {context} "
                          "(with GLM's mask and sop), leaving none to generate", "prompt", "context_length_exceeded")
            if context + req.max_tokens > limit:
                raise bad(f"This model's maximum context length is {limit} tokens, however you requested "
                          f"{context + req.max_tokens} tokens ({context} in your prompt; {req.max_tokens} for the "
                          "completion). Please reduce your prompt; or completion length.", "max_tokens",
                          "context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        strategy = req.strategy()
        events, emit = self._channel()
        job = Job(emit, tokens=True)
        for prompt in prompts:
            for choice in range(req.n):  # choice c of every prompt draws from seed + c
                job.add(prompt, strategy, new_generator((seed + choice) % (protocol.SEED_MAX + 1)),
                        len(prompt.ids) + 1 + req.max_tokens)
        self._submit(job)
        prompt_tokens = sum(len(p.ids) + 1 for p in prompts)  # once per prompt whatever `n`, as OpenAI counts
        choices = [_Choice(TextStream(req.stop)) for _ in job.tasks]
        state = _Progress(self, request, job, events, choices, req, arrived)
        meta = (protocol.new_id("cmpl"), protocol.now(), req.model)
        if req.stream:
            return TimedStreamingResponse(self._stream(state, meta, prompt_tokens), self.settings.request_timeout,
                                          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while not state.finished:
                state.take(await self._next(request, events, state.deadline, state.watch))
        except BaseException as error:
            self.engine.cancel(job)
            if isinstance(error, Disconnected):
                self.metrics.requests.labels("/v1/completions", "cancelled").inc()
                return Response(status_code=499)
            raise
        self._done("/v1/completions", arrived)
        return protocol.completion_object(*meta, [protocol.completion_choice(i, c.stream.text, c.finish_reason)
                                                  for i, c in enumerate(choices)],
                                          protocol.usage(prompt_tokens, state.generated))

    async def _stream(self, state: "_Progress", meta: tuple, prompt_tokens: int):
        """Server-sent events: a chunk per piece of text, a last one per choice with its
        finish_reason, the usage if asked, then [DONE]."""
        def chunk(index: int, text: str, finish_reason: str | None) -> str:
            body = protocol.completion_object(*meta, [protocol.completion_choice(index, text, finish_reason)], None)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        ended = False  # with [DONE] or an error event
        try:
            while not state.finished:
                try:
                    event = await self._next(state.request, state.events, state.deadline, state.watch)
                    pieces = state.take(event)
                except ApiError as error:
                    ended = True
                    self.engine.cancel(state.job)
                    self.metrics.requests.labels("/v1/completions", "error").inc()
                    log.warning("%d POST /v1/completions (streaming): %s", error.status, error.message)
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                for index, text, finish_reason in pieces:
                    yield chunk(index, text, finish_reason)
            if state.req.include_usage:
                body = protocol.completion_object(*meta, [], protocol.usage(prompt_tokens, state.generated))
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            ended = True
            self._done("/v1/completions", state.arrived)
        except Disconnected:
            pass
        finally:  # the client left (seen here, or by Starlette, which cancels this stream): free its rows
            if not ended:
                self.engine.cancel(state.job)
                self.metrics.requests.labels("/v1/completions", "cancelled").inc()

    def _done(self, endpoint: str, arrived: float) -> None:
        self.metrics.requests.labels(endpoint, "ok").inc()
        self.metrics.request_seconds.observe(time.monotonic() - arrived)

    # --- /v1/generate -------------------------------------------------------------------------
    async def generate(self, request: Request):
        arrived = time.monotonic()
        body = await _read_json(request, self.settings.max_body_bytes, self.settings.request_timeout)
        req = protocol.parse_generate(body, self.limits)
        prompt = self._prompt(req.prompt)
        if len(prompt.ids) + 1 >= req.out_seq_length:
            raise bad(f"the prompt is {len(prompt.ids) + 1} tokens long with its sop; out_seq_length "
                      f"{req.out_seq_length} (the total length) leaves no room to generate", "out_seq_length",
                      "context_length_exceeded")
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        events, emit = self._channel()
        job = Job(emit, tokens=False)
        job.add(prompt, req.strategy(), new_generator(seed), req.out_seq_length)
        self._submit(job)
        deadline = arrived + self.settings.request_timeout
        try:
            event = await self._next(request, events, deadline, _Watch())
        except BaseException as error:
            self.engine.cancel(job)
            if isinstance(error, Disconnected):
                self.metrics.requests.labels("/v1/generate", "cancelled").inc()
                return Response(status_code=499)
            raise
        if event[0] == ERROR:
            raise self._engine_error(event)
        filled: Filled = event[2]
        self._done("/v1/generate", arrived)
        decode = self._decode if self.glm.tokenizer is not None else None
        generated = sum(len(blank) for blank in filled.blanks[0])
        return {"id": protocol.new_id("gen"), "object": "generation", "created": protocol.now(), "model": req.model,
                "seed": seed, "input": prompt.text,
                "answers": [decode(t) for t in filled.token_ids] if decode else None,
                "blanks": [[decode(b) for b in beam] for beam in filled.blanks] if decode else None,
                "token_ids": filled.token_ids, "blank_ids": filled.blanks, "scores": filled.scores,
                "usage": protocol.usage(len(prompt.ids) + 1, generated)}


class _Progress:
    """A completion's choices as its events come: text, stops, finish reasons, token counts."""

    def __init__(self, service: _Service, request: Request, job: Job, events: asyncio.Queue, choices: list[_Choice],
                 req: protocol.CompletionRequest, arrived: float):
        self.service, self.request, self.job, self.events, self.choices = service, request, job, events, choices
        self.req, self.arrived = req, arrived
        self.deadline = arrived + service.settings.request_timeout
        self.watch = _Watch()
        self.generated = 0  # tokens the client's text used (a choice cut at a stop string counts up to it)
        self.first = True

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def take(self, event: tuple) -> list[tuple[int, str, str | None]]:
        """Absorb one event; returns the (choice, text, finish_reason) pieces to send."""
        service, metrics = self.service, self.service.metrics
        if event[0] == ERROR:
            raise service._engine_error(event)
        index = event[1]
        choice = self.choices[index]
        if choice.finished:
            return []  # tokens after a stop string, before the engine dropped the choice
        now = time.monotonic()
        if event[0] == TOKEN:
            if self.first:
                metrics.time_to_first_token.observe(now - self.arrived)
                self.first = False
            if choice.last_token_at is not None:
                metrics.time_per_token.observe(now - choice.last_token_at)
            choice.last_token_at = now
            token = event[2]
            if token < 0 or token in service.end_tokens:
                return []  # the blank's end: DONE follows with the finish reason
            choice.tokens.append(token)
            self.generated += 1
            delta = choice.stream.update(service._decode(choice.tokens))
            if choice.stream.stopped:
                choice.finish_reason = "stop"
                service.engine.cancel(self.job, (index,))
                return [(index, delta, "stop")]
            return [(index, delta, None)] if delta else []
        assert event[0] == DONE
        filled: Filled = event[2]
        blank = filled.blanks[0][0]
        if blank != choice.tokens:  # the events are the blank's tokens; the result must agree
            raise ApiError(500, "internal error: streamed tokens differ from the result", "server_error")
        delta = choice.stream.update(service._decode(blank), final=True)
        choice.finish_reason = "length" if len(blank) >= self.req.max_tokens and not choice.stream.stopped \
            else "stop"
        return [(index, delta, choice.finish_reason)]
