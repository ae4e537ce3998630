"""The server's requests and responses: OpenAI's completions shapes and GLM's own generate shape.

A request body is strict JSON (glmc.fileio.parse_json: no NaN, no key twice, bounded
depth); each field is checked for its type and range here, before anything reaches the
model, and a bad one is an `ApiError` that becomes HTTP 400 with OpenAI's error JSON
(`{"error": {"message", "type", "param", "code"}}`). Fields OpenAI defines but glmc does
not implement (echo, logprobs, penalties, logit_bias, suffix, best_of) are accepted at
their neutral value and refused otherwise; fields OpenAI does not define are refused
with OpenAI's own message ("Unrecognized request argument supplied"), except the
extensions named here (`top_k`, `min_tokens`).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy

SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer
MAX_N = 128  # choices per prompt
MAX_GENERATIONS = 256  # prompts x choices in one request: each is a generation the server holds
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 20


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        # Messages echo the client's strings: a lone surrogate would not encode as UTF-8 JSON.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = param.encode("utf-8", "backslashreplace").decode("utf-8") if param is not None else None
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the model's and the server's limits."""

    name: str  # the served model's id
    max_sequence_length: int
    vocab_size: int
    max_rows: int  # rows the running batch may hold (a beam search takes one per beam)
    has_tokenizer: bool


# --- field checks ---------------------------------------------------------------------------

def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {_shown(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _number(body: dict, name: str, default: float | None, low: float, high: float) -> float | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {_shown(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be in [{low:g}, {high:g}], got {value:g}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_shown(value)}", name)
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _prompt(value: Any, name: str, vocab_size: int) -> str | list[int]:
    """One prompt: text, or token ids."""
    if isinstance(value, str):
        if not value:
            raise bad(f"'{name}' is empty", name)
        if len(value) > MAX_PROMPT_CHARS:
            raise bad(f"'{name}' is longer than {MAX_PROMPT_CHARS} characters", name)
        return value
    if isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        if any(not 0 <= i < vocab_size for i in value):
            raise bad(f"'{name}': token ids must lie in [0, {vocab_size})", name)
        return list(value)
    raise bad(f"'{name}' must be a string or a non-empty list of token ids", name)


def _unknown_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise bad(f"Unrecognized request argument supplied: {name}", name)


def _model(body: dict, limits: ModelLimits, required: bool) -> str:
    model = body.get("model")
    if model is None and not required:
        return limits.name
    if not isinstance(model, str):
        raise bad("'model' must be the served model's id (GET /v1/models)", "model")
    if model != limits.name:
        raise ApiError(404, f"The model `{model[:100]}` does not exist; this server serves `{limits.name}`",
                       "invalid_request_error", "model", "model_not_found")
    return model


# --- /v1/completions ------------------------------------------------------------------------

# OpenAI's fields this server takes at their neutral value only: name -> what is accepted.
_NEUTRAL = {"echo": (False,), "logprobs": (None,), "suffix": (None,), "frequency_penalty": (0, 0.0),
            "presence_penalty": (0, 0.0), "logit_bias": (None,)}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
                     "stream_options", "user", "best_of", *_NEUTRAL, "top_k", "min_tokens"}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str | tuple[int, ...], ...]
    max_tokens: int  # bounds the blank (steps, its end token included)
    min_tokens: int  # end tokens held back this long (GLM's min_gen_length)
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool

    def strategy(self) -> BaseStrategy:
        """OpenAI's sampling parameters as GLM's BaseStrategy: temperature 0 or top_p 0 is greedy
        (top_k 1), top_p 1 keeps every token (GLM's top_p 0, which skips the filter)."""
        greedy = self.temperature == 0 or self.top_p == 0
        return BaseStrategy(1.0 if self.temperature == 0 else self.temperature, 1 if greedy else self.top_k,
                            0.0 if self.top_p >= 1 or greedy else self.top_p, min_gen_length=self.min_tokens,
                            seed=None)


def parse_completion(body: Any, limits: ModelLimits) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _unknown_fields(body, COMPLETION_FIELDS)
    model = _model(body, limits, required=True)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    raw = body["prompt"]
    # OpenAI's four forms: a string, a list of strings, a list of ids, a list of lists of ids.
    if isinstance(raw, list) and raw and all(isinstance(p, (str, list)) for p in raw):
        prompts = [_prompt(p, "prompt", limits.vocab_size) for p in raw]
    else:
        prompts = [_prompt(raw, "prompt", limits.vocab_size)]
    for name, accepted in _NEUTRAL.items():
        if name in body and body[name] not in accepted and not (name == "logit_bias" and body[name] == {}):
            raise bad(f"'{name}' is not supported by glmc (only {accepted[0]!r})", name)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user")
    max_tokens = _integer(body, "max_tokens", 16, 1, limits.max_sequence_length)
    min_tokens = _integer(body, "min_tokens", 0, 0, max_tokens)
    n = _integer(body, "n", 1, 1, MAX_N)
    best_of = _integer(body, "best_of", n, 1, MAX_N)
    if best_of != n:
        raise bad("'best_of' other than 'n' is not supported by glmc", "best_of")
    if len(prompts) * n > MAX_GENERATIONS:
        raise bad(f"{len(prompts)} prompts x n {n} is more than {MAX_GENERATIONS} generations in one request", "n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _integer(body, "top_k", 0, -1, limits.vocab_size)
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else () if stop is None else None
    if stops is None or len(stops) > MAX_STOPS or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS
                                                      for s in stops):
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings of at most "
                  f"{MAX_STOP_CHARS} characters", "stop")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("'stream_options' takes only 'include_usage'", "stream_options")
        include_usage = _boolean(options, "include_usage", False)
    return CompletionRequest(model, tuple(p if isinstance(p, str) else tuple(p) for p in prompts), max_tokens,
                             min_tokens, temperature, top_p, max(top_k, 0), n, stops,
                             _integer(body, "seed", None, 0, SEED_MAX), stream, include_usage)


# --- /v1/generate ---------------------------------------------------------------------------

SAMPLING_FIELDS = ("temperature", "top_k", "top_p")
BEAM_FIELDS = ("num_beams", "length_penalty", "no_repeat_ngram_size", "beam_sampling")
GENERATE_FIELDS = {"model", "prompt", "strategy", "out_seq_length", "min_gen_length", "seed", *SAMPLING_FIELDS,
                   *BEAM_FIELDS}


@dataclass(frozen=True)
class GenerateRequest:
    """GLM's own semantics, those of `glmc run`: every mask filled left to right, beam search
    with its options, every beam returned."""

    model: str
    prompt: str | tuple[int, ...]
    beam_search: bool
    out_seq_length: int  # the total length: context plus blank, as GLM-130B's --out-seq-length
    min_gen_length: int
    seed: int | None
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    beam_sampling: bool

    @property
    def rows(self) -> int:
        return self.num_beams if self.beam_search else 1

    def strategy(self) -> BaseStrategy | BeamSearchStrategy:
        if self.beam_search:
            return BeamSearchStrategy(self.num_beams, self.length_penalty,
                                      no_repeat_ngram_size=self.no_repeat_ngram_size,
                                      min_gen_length=self.min_gen_length, deterministic=not self.beam_sampling,
                                      seed=None)
        return BaseStrategy(self.temperature, self.top_k, self.top_p, min_gen_length=self.min_gen_length, seed=None)


def parse_generate(body: Any, limits: ModelLimits) -> GenerateRequest:
    """`glmc run`'s options as JSON fields, with its defaults (GLM-130B's scripts/generate.sh)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _unknown_fields(body, GENERATE_FIELDS)
    model = _model(body, limits, required=False)
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    prompt = _prompt(body["prompt"], "prompt", limits.vocab_size)
    strategy = body.get("strategy", "sampling")
    if strategy not in ("sampling", "beam_search"):
        raise bad("'strategy' must be \"sampling\" or \"beam_search\"", "strategy")
    beam = strategy == "beam_search"
    wrong = BEAM_FIELDS if not beam else SAMPLING_FIELDS
    for name in wrong:
        if name in body:
            raise bad(f"'{name}' does not apply to strategy \"{strategy}\"", name)
    max_beams = min(limits.max_rows, limits.vocab_size // 2)
    return GenerateRequest(
        model, prompt if isinstance(prompt, str) else tuple(prompt), beam,
        _integer(body, "out_seq_length", min(256, limits.max_sequence_length), 2, limits.max_sequence_length),
        _integer(body, "min_gen_length", 0, 0, limits.max_sequence_length),
        _integer(body, "seed", None, 0, SEED_MAX),
        _number(body, "temperature", 1.0, 1e-6, 100.0),
        _integer(body, "top_k", 0, 0, limits.vocab_size),
        _number(body, "top_p", 0.7, 0.0, 1.0),
        _integer(body, "num_beams", min(4, max_beams), 1, max_beams),
        _number(body, "length_penalty", 1.0, -100.0, 100.0),
        _integer(body, "no_repeat_ngram_size", 3, 0, limits.max_sequence_length),
        _boolean(body, "beam_sampling", False))


# --- responses ------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion_object(id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_list(name: str, created: int, max_sequence_length: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "glmc",
                                        "max_model_len": max_sequence_length}]}


def now() -> int:
    return int(time.time())
