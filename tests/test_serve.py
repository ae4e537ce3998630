"""`glmc serve` as a real process on 127.0.0.1, talked to by the official openai client and httpx.

Answers are checked against the same prompt generated alone: `glmc run` in a process of its
own, or `glmc.load().generate` in this one (the reference path, `fill_blanks`, which the
server does not use). The embedded model and short blanks keep it quick.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import glmc
from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy

MODEL = "glmc-default"
START_SECONDS = 180  # a server's start-up: importing torch and FastAPI, loading the model (TP 2: two ranks)


class Server:
    """`python -m glmc serve --port 0 ...` with its stderr collected line by line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "glmc", "serve", "--port", "0", *args],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_SECONDS) or self.url is None:
            self.process.kill()
            pytest.fail(f"the server did not start: {self.stderr[-3000:]}")

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            found = re.search(r"glmc: serving \S+ at (http://\S+)", line)
            if found:
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()  # the process ended

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def openai(self) -> openai.OpenAI:
        # No retries: a 429 must reach the test, not be retried away.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
        found = re.search(r"^" + pattern + "$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail("the server did not stop within the limit")


def until(condition, what: str, limit: float = 30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {limit} s")


@pytest.fixture(scope="module")
def server():
    server = Server("--max-batch-rows", "8")
    with server.client() as client:  # warm: the first request's imports and allocations are behind it
        assert client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).is_success
    yield server
    assert server.stop() == 0, server.stderr[-3000:]
    assert "glmc: stopped" in server.stderr and "Traceback" not in server.stderr


@pytest.fixture(scope="module")
def embedded():
    return glmc.load()


def alone(model, prompt: str, max_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 0.7) -> str:
    """The blank `prompt` gets by itself through `fill_blanks`, `max_tokens` bounding it."""
    length = len(model.prompt(prompt).ids) + 1 + max_tokens  # context with sop, then the blank
    result = model.generate(prompt, BaseStrategy(temperature, 0, top_p, seed=seed), out_seq_length=length)
    return result.blanks[0][0]


def glmc_run(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "glmc", "run", "--json", "--no-output-files", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["The best way to learn is", "春眠不觉晓，"])
def test_openai_client_streamed_and_whole_text_agree_with_glmc_run(server, prompt):
    client = server.openai()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=14, seed=7, top_p=0.7)
    pieces = [chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=14, seed=7, top_p=0.7, stream=True)]
    text = whole.choices[0].text
    assert text and "".join(pieces) == text
    assert whole.choices[0].finish_reason in ("stop", "length")
    (record,) = glmc_run("--seed", "7", "--top-p", "0.7", "--out-seq-length",
                         str(whole.usage.prompt_tokens + 14), prompt)
    assert record["blanks"][0][0] == text
    assert whole.usage.completion_tokens == len(record["blank_ids"][0][0])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert (whole.choices[0].finish_reason == "length") == (whole.usage.completion_tokens == 14)


def test_raw_event_stream_ends_in_done_with_usage(server):
    body = {"model": MODEL, "prompt": "Where there is a will, there is a [MASK].", "max_tokens": 8, "n": 2,
            "seed": 3, "stream": True, "stream_options": {"include_usage": True}}
    with server.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL
        (choice,) = chunk["choices"]
        assert choice["index"] not in finished  # nothing after a choice's last chunk
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert set(finished) == {0, 1}
    whole = server.client().post("/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert [c["text"] for c in whole["choices"]] == [texts[0], texts[1]]
    assert whole["usage"] == usage["usage"]
    single = server.client().post("/v1/completions", json={**body, "n": 1, "stream": False, "stream_options": None})
    assert whole["usage"]["prompt_tokens"] == single.json()["usage"]["prompt_tokens"]  # once, whatever n


def test_choices_draw_from_seed_plus_their_index(server, embedded):
    response = server.openai().completions.create(model=MODEL, prompt="The sea is", max_tokens=8, n=3, seed=40,
                                                  top_p=0.7)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [alone(embedded, "The sea is", 8, 40 + i) for i in range(3)]


def test_generate_fills_every_mask_with_all_beams_as_glmc_run(server):
    prompt = "Where there is a [MASK], there is a [MASK]."
    with server.client() as client:
        beams = client.post("/v1/generate", json={"prompt": prompt, "strategy": "beam_search", "num_beams": 3,
                                                  "out_seq_length": 40}).json()
        sampled = client.post("/v1/generate", json={"prompt": prompt, "seed": 5, "top_k": 20,
                                                    "out_seq_length": 40}).json()
    (run_beams,) = glmc_run("--sampling-strategy", "BeamSearchStrategy", "--num-beams", "3", "--out-seq-length",
                            "40", prompt)
    for key in ("input", "answers", "blanks", "token_ids", "blank_ids", "scores"):
        assert beams[key] == run_beams[key], key
    assert len(beams["answers"]) == 3 and len(beams["blank_ids"][0]) == 2  # every beam, both blanks
    (run_sampled,) = glmc_run("--seed", "5", "--top-k", "20", "--out-seq-length", "40", prompt)
    assert sampled["token_ids"] == run_sampled["token_ids"] and sampled["seed"] == 5


def test_a_request_without_a_seed_draws_a_random_one(server):
    with server.client() as client:
        seeds = {client.post("/v1/generate", json={"prompt": "Hello [MASK]", "out_seq_length": 12}).json()["seed"]
                 for _ in range(2)}
    assert len(seeds) == 2


def test_a_stop_string_ends_the_choice_before_it(server, embedded):
    prompt = "The best way to learn is"
    length = len(embedded.prompt(prompt).ids) + 1 + 60  # a blank of exactly 60 tokens: no end before
    full = embedded.generate(prompt, BaseStrategy(1.0, 0, 0.7, min_gen_length=60, seed=13),
                             out_seq_length=length).blanks[0][0]
    stop = full.split()[3]  # a word near the start of the blank
    generated = server.metric("glmc_generation_tokens_total")
    response = server.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=60, seed=13, top_p=0.7,
                                                  stop=["no such text", stop], extra_body={"min_tokens": 60})
    choice = response.choices[0]
    assert choice.text == full[:full.index(stop)] and choice.finish_reason == "stop"
    assert response.usage.completion_tokens < 20
    # The choice left the batch soon after its stop string, far from its 60 tokens.
    until(lambda: server.get("/health").json()["rows"] == 0, "the rows' release")
    assert server.metric("glmc_generation_tokens_total") - generated < 40


def test_concurrent_clients_each_get_their_own_answer(server, embedded):
    """32 requests from 8 clients at once, sampling and beam search sharing the batch: each
    answer is the one its prompt gets alone (nothing lost, nothing mixed)."""
    words = ["sea", "mountain", "river", "teacher", "friend", "money", "time", "love"]
    requests = []
    for i in range(32):
        if i % 8 == 7:  # a beam search among the samples
            requests.append(("beam", f"The {words[i // 8]} is [MASK].", 16, 3))
        else:
            requests.append(("sample", f"The {words[i % 8]} of {words[i // 8]} is", 4 + i % 9, 100 + i))
    barrier = threading.Barrier(8)

    def client_work(slot: int) -> list[tuple[int, object]]:
        out = []
        with server.client() as client:
            barrier.wait(60)
            for i in range(slot, 32, 8):
                kind, prompt, length, seed = requests[i]
                if kind == "beam":
                    body = {"prompt": prompt, "strategy": "beam_search", "num_beams": seed, "out_seq_length": 24}
                    out.append((i, client.post("/v1/generate", json=body).json()["answers"]))
                elif i % 2:
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": length, "seed": seed, "top_p": 0.7,
                            "stream": True}
                    with client.stream("POST", "/v1/completions", json=body) as response:
                        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                                  if line.startswith("data: {")]
                    out.append((i, "".join(c["choices"][0]["text"] for c in chunks)))
                else:
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": length, "seed": seed, "top_p": 0.7}
                    out.append((i, client.post("/v1/completions", json=body).json()["choices"][0]["text"]))
        return out

    steps_before = server.metric("glmc_batch_step_seconds_count")
    tokens_before = server.metric("glmc_generation_tokens_total")
    with ThreadPoolExecutor(8) as pool:
        answers = dict(pair for part in pool.map(client_work, range(8)) for pair in part)
    assert sorted(answers) == list(range(32))
    for i, (kind, prompt, length, seed) in enumerate(requests):
        if kind == "beam":
            expected = embedded.generate(prompt, BeamSearchStrategy(seed, no_repeat_ngram_size=3),
                                         out_seq_length=24).answers
        else:
            expected = alone(embedded, prompt, length, seed)
        assert answers[i] == expected, (i, prompt)
    steps = server.metric("glmc_batch_step_seconds_count") - steps_before
    tokens = server.metric("glmc_generation_tokens_total") - tokens_before
    assert steps < tokens  # rows of several requests shared steps


def test_models_and_health(server):
    with server.client() as client:
        models = client.get("/v1/models").json()
        health = client.get("/health")
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["max_batch_rows"] == 8
    assert [m.id for m in server.openai().models.list()] == [MODEL]


# --- refusals -------------------------------------------------------------------------------

LONG_PROMPT = "word " * 600  # more tokens than the embedded model's 512 positions


@pytest.mark.parametrize("path,body,status,param,fragment", [
    ("/v1/completions", b'{"model": "glmc-default", "prompt": ', 400, None, "could not parse the JSON"),
    ("/v1/completions", b'{"model": "glmc-default", "model": "x", "prompt": "a"}', 400, None, "given twice"),
    ("/v1/completions", b'{"model": "glmc-default", "prompt": "a", "temperature": NaN}', 400, None, "not JSON"),
    ("/v1/completions", b'[1, 2]', 400, None, "JSON object"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "frobnicate": 1}, 400, "frobnicate",
     "Unrecognized request argument supplied: frobnicate"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 510}, 400, "max_tokens",
     "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 10**6}, 400, "max_tokens", "[1, 512]"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "n": 0}, 400, "n", "[1, 128]"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "at most 4"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "A [MASK] and a [MASK]"}, 400, "prompt", "several"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt", "token ids must lie"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hello"}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": "gpt-\ud800", "prompt": "Hello"}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hello", "temperature": 1e-40}, 400, None, "too small"),
    ("/v1/generate", {"prompt": "Hi [MASK]", "strategy": "beam_search", "temperature": 0.5}, 400, "temperature",
     "does not apply"),
    ("/v1/generate", {"prompt": "Hi [MASK]", "num_beams": 2}, 400, "num_beams", "does not apply"),
    ("/v1/generate", {"prompt": "Hi [MASK]", "strategy": "beam_search", "num_beams": 9}, 400, "num_beams",
     "[1, 8]"),
    ("/v1/generate", {"prompt": "Hi [MASK]", "out_seq_length": 4}, 400, "out_seq_length", "no room"),
    ("/v1/completions", b'{"model": "glmc-default", "prompt": "' + b"x" * (2 << 20) + b'"}', 413, None,
     "larger than"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
], ids=["malformed", "duplicate-key", "nan", "not-an-object", "unknown-field", "prompt-too-long", "max-tokens-past",
        "max-tokens-range", "max-tokens-bool", "n-zero", "five-stops", "echo", "several-masks", "bad-ids",
        "unknown-model", "lone-surrogate", "temperature-overflows", "beam-with-temperature", "sampling-with-beams", "beams-past-rows", "no-room", "too-large",
        "no-route"])
def test_bad_requests_get_openai_errors_and_one_log_line(server, path, body, status, param, fragment):
    logged = len([line for line in server.lines if " glmc.serve: " in line])
    with server.client() as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment in error["message"], error["message"]
    until(lambda: len([line for line in server.lines if " glmc.serve: " in line]) > logged, "the log line")
    time.sleep(0.2)
    new = [line for line in server.lines if " glmc.serve: " in line][logged:]
    assert len(new) == 1 and str(status) in new[0] and "\n" not in new[0], new


def test_unknown_paths_share_one_metrics_label(server):
    """A client making up paths cannot grow the metrics: every unknown path counts as "other"."""
    before = server.metric("glmc_requests_total", endpoint="other", outcome="bad_request")
    for k in range(3):
        assert server.get(f"/made-up/{k}").status_code == 404
    text = server.get("/metrics").text
    assert "/made-up/" not in text
    assert server.metric("glmc_requests_total", endpoint="other", outcome="bad_request") == before + 3


def test_openai_client_sees_bad_request(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().completions.create(model=MODEL, prompt="Hello", max_tokens=600)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_client_that_disconnects_frees_its_rows(server, stream):
    """32 choices of 480 tokens on 8 rows: about 2,000 steps, far more than the client stays."""
    cancelled = server.metric("glmc_requests_total", endpoint="/v1/completions", outcome="cancelled")
    generated = server.metric("glmc_generation_tokens_total")
    body = {"model": MODEL, "prompt": "The best way to learn is", "max_tokens": 480, "min_tokens": 480, "n": 32,
            "stream": stream}
    with server.client() as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()  # held: closing the iterator would close the connection
                next(line for line in lines if line.startswith("data: {"))
                assert server.get("/health").json()["rows"] == 8
        else:  # the client gives up waiting for the whole answer
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    # The connection is closed: the request's rows leave the batch at the next step.
    until(lambda: server.metric("glmc_requests_total", endpoint="/v1/completions", outcome="cancelled") > cancelled,
          "the cancellation")
    until(lambda: server.get("/health").json()["rows"] == 0, "the rows' release")
    assert server.metric("glmc_generation_tokens_total") - generated < 32 * 480 / 2  # it left long before the end


# --- overload, draining, options ------------------------------------------------------------

def test_a_full_queue_gets_429_and_sigterm_drains():
    """One row and a queue of one: a request running (its choices one after another), one
    queued; the next gets 429 with Retry-After. SIGTERM then lets both finish (the drain), and
    the server exits 0."""
    server = Server("--max-batch-rows", "1", "--max-queue", "1", "--drain-timeout", "120")
    try:
        # 4 choices of 480 tokens, one after another on the one row: about 1,900 steps
        long = {"model": MODEL, "prompt": "The best way to learn is", "max_tokens": 480, "min_tokens": 480, "n": 4,
                "stream": True}
        with server.client() as client, client.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it is in the batch
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(server.client().post, "/v1/completions",
                                     json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                until(lambda: server.get("/health").json()["queued"] == 1, "a request in the queue")
                refused = server.client().post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                with pytest.raises(openai.RateLimitError):
                    server.openai().completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                server.process.send_signal(signal.SIGTERM)  # drain: the running and queued requests finish
                rest = [line for line in lines if line]
                assert rest[-1] == "data: [DONE]"
                assert queued.result().status_code == 200, queued.result().text
        assert server.stop() == 0
        assert "glmc: stopped" in server.stderr and "Traceback" not in server.stderr
    finally:
        server.stop(signal.SIGKILL)


def test_requests_past_the_in_flight_limit_get_503_json():
    """Slow clients (a body that never arrives) can hold only so many handlers: past the limit
    (2 x (queue + rows) + 16: 20 here) a request gets 503 with OpenAI's error JSON and
    Retry-After, not uvicorn's plain text; once they leave, requests are served again."""
    server = Server("--max-batch-rows", "1", "--max-queue", "1", "--request-timeout", "60")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    stalled = []
    try:
        for _ in range(20):
            sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")  # and the other 99 bytes never come
            stalled.append(sock)
        refused = until(lambda: (r := server.get("/v1/models")).status_code == 503 and r, "a 503")
        assert refused.headers["retry-after"] == "1" and refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "server_busy" and "20 requests" in refused.json()["error"]["message"]
        for sock in stalled:
            sock.close()
        until(lambda: server.get("/v1/models").status_code == 200, "a request served again")
        assert server.metric("glmc_requests_total", endpoint="/v1/models", outcome="overloaded") >= 1
        assert server.stop() == 0
        assert "503 GET /v1/models" in server.stderr and "Traceback" not in server.stderr
    finally:
        for sock in stalled:
            sock.close()
        server.stop(signal.SIGKILL)


def test_the_drain_is_bounded():
    """Ctrl-C with a request that would run far longer than --drain-timeout: it is cut, and the
    server stops."""
    server = Server("--max-batch-rows", "1", "--drain-timeout", "1")
    try:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 480, "min_tokens": 480, "n": 16, "stream": True}
        received = []
        with server.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            server.process.send_signal(signal.SIGINT)  # Ctrl-C
            try:  # 16 x 480 steps on one row outlast the drain
                received += [line for line in lines if line]
            except httpx.HTTPError:
                pass
        assert "data: [DONE]" not in received
        assert server.process.wait(60) == 0
        assert "glmc: stopped" in server.stderr and "Traceback" not in server.stderr
        assert "cut at the end of the drain" in server.stderr
    finally:
        server.stop(signal.SIGKILL)


def test_serve_help_is_complete_and_bad_options_are_one_line():
    result = subprocess.run([sys.executable, "-m", "glmc", "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for option in ("--host", "--port", "--served-model-name", "--max-batch-rows", "--max-queue", "--max-body-bytes",
                   "--drain-timeout", "--request-timeout", "--checkpoint", "--package", "--backend", "--tp",
                   "/v1/completions", "/v1/generate", "/metrics", "/health"):
        assert option in result.stdout, option
    for args, fragment in ((["--port", "70000"], "--port"), (["--max-batch-rows", "0"], "--max-batch-rows"),
                           (["--drain-timeout", "nan"], "--drain-timeout")):
        bad = subprocess.run([sys.executable, "-m", "glmc", "serve", *args], capture_output=True, text=True,
                             timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and fragment in lines[0], bad.stderr


def test_a_port_in_use_is_one_line(server):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "glmc", "serve", "--port", port], capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("glmc: error: --host 127.0.0.1 --port") and "cannot listen" in lines[0]


# --- tensor parallelism ---------------------------------------------------------------------

def _workers(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()
            if "glmc.runtime.worker" in open(f"/proc/{p}/cmdline").read().replace("\0", " ")]


def test_tp2_serves_and_a_dead_rank_fails_health_and_stops_the_server(server):
    tp = Server("--tp", "2")
    try:
        body = {"model": MODEL, "prompt": "The best way to learn is", "max_tokens": 10, "temperature": 0}
        single = server.client().post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert tp.client().post("/v1/completions", json=body).json()["choices"][0]["text"] == single
        assert tp.get("/health").status_code == 200
        (worker,) = _workers(tp.process.pid)
        os.kill(worker, signal.SIGKILL)

        def health_failed():
            try:
                return httpx.get(f"{tp.url}/health", timeout=10).status_code == 503
            except httpx.TransportError:
                return True  # already gone

        until(health_failed, "/health failing")
        assert tp.process.wait(60) == 1
        assert "rank 1 was killed by SIGKILL" in tp.stderr and "Traceback" not in tp.stderr
        assert [line for line in tp.lines if line.startswith("glmc: error:")][-1].count("rank 1") == 1
    finally:
        tp.stop(signal.SIGKILL)
