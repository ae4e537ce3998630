"""The engine: one thread owns the model and runs one `Batch` that requests join and leave.

Requests arrive as `Job`s through a bounded queue (`submit` refuses when it is full: the
server answers 429). A job holds one `Task` per prompt and choice: GLM's blank filling of
that prompt (`FillState`: its masks left to right, one generation per blank, each blank
substituted back before the next, as `fill_blanks` does), drawing from its own generator.
The engine loops: cancelled tasks leave the batch (their rows are freed), waiting tasks
join it (their contexts prefilled together, their caches merged into the batch's) while
the rows and the cache's length allow, then the batch steps once. Every generation has
its own rows (one when sampling, one per beam), strategy state and generator, so sampling
and beam requests share the batch and each gets the tokens it gets alone.

Tokens and results reach the client through `Job.emit`, which must be thread-safe (the
app hands them to its asyncio loop); the engine never waits on a client.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from glmc.errors import GlmcError
from glmc.generation.batch import Batch, Group
from glmc.generation.filling import BlankRequest, FillState, Prompt

IDLE_POLL_SECONDS = 0.05  # an idle engine looks for new work and for the stop this often

TOKEN, DONE, ERROR = "token", "done", "error"  # the events a job receives


class Overloaded(Exception):
    """The queue is full: the client should retry later."""


class Stopped(Exception):
    """The engine no longer takes requests (shutting down, or failed)."""


@dataclass(eq=False)
class Task:
    """One prompt's blanks, for one choice of a request."""

    job: "Job"
    index: int  # the choice's index in the request
    fill: FillState
    strategy: object
    generator: torch.Generator
    out_seq_length: int
    rows: int  # rows its generations take in the batch: 1, or the number of beams
    blank: BlankRequest | None = None  # the blank being generated
    group: Group | None = None  # its generation in the batch, while there
    admitted: bool = False  # its rows are reserved
    cancelled: bool = False


@dataclass(eq=False)
class Job:
    """One HTTP request's generations and where their events go.

    `emit(event)` receives (TOKEN, index, token id) after each step when `tokens` is set,
    (DONE, index, Filled) when a task's last blank is done, (ERROR, status, message) once
    if the job fails; it is called from the engine thread."""

    emit: Callable[[tuple], None]
    tokens: bool  # stream each step's token (sampling only: beams reorder)
    tasks: list[Task] = field(default_factory=list)
    cancelled: bool = False
    started: bool = False  # a task of it has joined the batch
    arrived: float = field(default_factory=time.monotonic)

    def add(self, prompt: Prompt, strategy, generator: torch.Generator, out_seq_length: int) -> Task:
        task = Task(self, len(self.tasks), FillState(prompt, strategy.num_beams), strategy, generator,
                    out_seq_length, strategy.num_beams)
        self.tasks.append(task)
        return task


class Engine:
    def __init__(self, glm, *, max_rows: int, max_queue: int, metrics=None,
                 on_failure: Callable[[str], None] | None = None):
        self.glm, self.max_rows, self.metrics, self.on_failure = glm, max_rows, metrics, on_failure
        self.special = glm.special_tokens()
        self.max_length = glm.config.max_sequence_length  # the cache's length stays within what backends take
        self.batch = Batch(glm.executable, self.special, glm.device)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._waiting: deque[Task] = deque()  # admitted to the engine, not yet to the batch (FIFO)
        self._rejoin: deque[Task] = deque()  # between two blanks: rows reserved, next blank waiting
        self._by_group: dict[Group, Task] = {}
        self._joining: list[Task] = []  # being prefilled into the batch (failed with the rest if that fails)
        self._cancels: list[tuple[Job, tuple[int, ...] | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._accepting = True
        self.reserved_rows = 0
        self.state = {"rows": 0, "running": 0, "queued": 0}  # the engine's counts, for /health
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="glmc-serve-engine", daemon=True)

    # --- called from the server's threads ---------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(self, job: Job) -> None:
        if not self._accepting or self.failure is not None:
            raise Stopped(self.failure or "the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded() from None
        if self.failure is not None:  # the engine failed while it was queued: nobody will take it
            raise Stopped(self.failure)
        if self.metrics is not None:
            self.metrics.queue_depth.inc()

    def cancel(self, job: Job, indices: tuple[int, ...] | None = None) -> None:
        """Drop a job's tasks (all, or the choices `indices`): they leave the batch at the next step."""
        with self._lock:
            if indices is None:
                job.cancelled = True
            self._cancels.append((job, indices))

    def close(self, timeout: float) -> bool:
        """Stop taking requests, end the loop (jobs still running get an error) and wait for it;
        False if the thread did not end within `timeout` seconds."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop_accepting(self) -> None:
        self._accepting = False

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_cancels()
                self._admit()
                self._gauges()
                if not self.batch.groups:
                    self._wait_for_work()
                    continue
                started, rows = time.monotonic(), self.batch.rows
                with self.glm.reporting():
                    finished = self.batch.step()
                if self.metrics is not None:
                    self.metrics.step_seconds.observe(time.monotonic() - started)
                    self.metrics.generation_tokens.inc(rows)
                for group in finished:
                    task = self._by_group[group]  # stays known until handled: a failure fails its job
                    if group.error is not None:  # its own draw failed; the batch goes on
                        del self._by_group[group]
                        self._release(task)
                        self._fail_job(task.job, 400, group.error, "invalid_request_error")
                        continue
                    self._blank_done(task)
                    del self._by_group[group]
        except BaseException as error:  # the model failed (a rank died, non-finite logits): the server stops
            self.failure = str(error) if isinstance(error, GlmcError) else f"{type(error).__name__}: {error}"
            self._fail_all(500, f"the model failed: {self.failure}", "server_error")
            if self.on_failure is not None:
                self.on_failure(self.failure)
            return
        self._fail_all(503, "the server is shutting down", "server_error")

    def _wait_for_work(self) -> None:
        cluster = getattr(self.glm, "cluster", None)
        if cluster is not None and cluster.failure is not None:  # a rank died while the batch was idle
            raise GlmcError(f"tensor-parallel run failed: {cluster.failure}")
        if self._waiting or self._rejoin:
            return
        try:
            job = self._queue.get(timeout=IDLE_POLL_SECONDS)
        except queue.Empty:
            return
        self._take(job)

    def _take(self, job: Job) -> None:
        if not job.cancelled:
            self._waiting.extend(job.tasks)

    def _admit(self) -> None:
        """Join waiting tasks to the batch, oldest first, while the rows and the cache allow:
        the batch's cache (left-padded to its longest row) must hold every generation's
        remaining tokens within the model's maximum length. An empty batch takes any task.
        The cache's positions that only generations that have left used do not count: the
        join drops them."""
        groups = self.batch.groups
        length = self.batch.live_length
        remaining = max((g.input.max_new_tokens - g.steps for g in groups), default=0)
        joining = []
        for source in (self._rejoin, self._waiting):
            while True:
                if not source:
                    if source is self._rejoin:
                        break
                    try:  # the next request from the queue
                        self._take(self._queue.get_nowait())
                    except queue.Empty:
                        break
                    continue
                task = source[0]
                if task.job.cancelled or task.cancelled:
                    self._release(source.popleft())
                    continue
                if not task.admitted and self.reserved_rows and self.reserved_rows + task.rows > self.max_rows:
                    break
                if task.blank is None:
                    try:
                        task.blank = task.fill.next_request(self.special, task.out_seq_length, task.index)
                    except GlmcError as error:  # a later blank with no room left
                        source.popleft()
                        self._fail_job(task.job, 400, str(error), "invalid_request_error")
                        continue
                request = task.blank.generation_input()
                new_length = max(length, len(request.tokens))
                new_remaining = max(remaining, request.max_new_tokens)
                if (groups or joining) and new_length + new_remaining > self.max_length:
                    break
                length, remaining = new_length, new_remaining
                source.popleft()
                if not task.admitted:
                    task.admitted = task.job.started = True
                    self.reserved_rows += task.rows
                joining.append((task, request))
            if source:
                break  # no overtaking: the oldest waits for room, the others behind it
        if not joining:
            return
        hooks = [functools.partial(self._on_step, task) if task.job.tokens else None for task, _ in joining]
        self._joining = [task for task, _ in joining]  # failed with the rest if the join fails
        with self.glm.reporting():
            new = self.batch.join([request for _, request in joining], [task.strategy for task, _ in joining],
                                  [task.generator for task, _ in joining], hooks)
        self._joining = []
        for (task, request), group in zip(joining, new):
            task.group = group
            self._by_group[group] = task
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(request.tokens) for _, request in joining))

    def _on_step(self, task: Task, beams: list[list[int]]) -> None:
        task.job.emit((TOKEN, task.index, beams[0][-1]))

    def _blank_done(self, task: Task) -> None:
        task.fill.absorb(task.blank, task.group.result, self.special)
        task.blank, task.group = None, None
        if task.job.cancelled or task.cancelled:
            self._release(task)
        elif task.fill.done:
            self._release(task)
            task.job.emit((DONE, task.index, task.fill.result(self.special)))
        else:
            self._rejoin.append(task)

    def _apply_cancels(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, []
        for job, indices in cancels:
            for task in job.tasks:
                if indices is not None and task.index not in indices:
                    continue
                task.cancelled = True
                if task.group is not None and task.group in self._by_group:
                    self.batch.cancel(task.group)
                    del self._by_group[task.group]
                    task.group = None
                for source in (self._waiting, self._rejoin):
                    if task in source:
                        source.remove(task)
                self._release(task)

    def _release(self, task: Task) -> None:
        """The task holds no rows any more."""
        if task.admitted:
            task.admitted = False
            self.reserved_rows -= task.rows

    def _fail_job(self, job: Job, status: int, message: str, kind: str) -> None:
        self.cancel(job)
        job.emit((ERROR, status, message, kind))

    def _fail_all(self, status: int, message: str, kind: str) -> None:
        jobs = {t.job for t in (*self._by_group.values(), *self._waiting, *self._rejoin, *self._joining)}
        while True:
            try:
                jobs.add(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in jobs:
            if not job.cancelled:
                job.cancelled = True
                job.emit((ERROR, status, message, kind))
        self._by_group.clear()
        self._waiting.clear()
        self._rejoin.clear()
        self._joining = []
        self.reserved_rows = 0
        self._gauges(rows=0)

    def _gauges(self, rows: int | None = None) -> None:
        """Publish the counts (engine thread only; others read `state`, replaced whole)."""
        jobs = {t.job for t in (*self._by_group.values(), *self._rejoin, *self._waiting)}
        self.state = {"rows": self.batch.rows if rows is None else rows,
                      "running": sum(job.started for job in jobs),
                      "queued": self._queue.qsize() + sum(not job.started for job in jobs)}
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.state["queued"])
            self.metrics.batch_rows.set(self.state["rows"])
            self.metrics.running.set(self.state["running"])
