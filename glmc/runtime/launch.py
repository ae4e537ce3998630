"""Start, watch and stop the ranks of a tensor-parallel run.

`glmc run --tp N` (and `glmc.load(..., tp_size=N)`) makes the calling process rank 0
and starts ranks 1..N-1 as worker processes (`python -m glmc.runtime.worker`), each
loading only its own rank. Under torchrun every process is started by torchrun,
which also watches them; `join` then only sets up the process groups.

Failure handling: a watcher thread on rank 0 notices a worker that exits (crash,
kill) and stops the others; the collectives time out (default 20 s) when a rank
hangs; workers die with rank 0 (PR_SET_PDEATHSIG), and are terminated when an error
or Ctrl-C interrupts rank 0 mid-step; every failure is reported as one line naming
the rank and the cause.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from glmc.devices import check_device, rank_device
from glmc.errors import GlmcError

COMMAND_TIMEOUT = timedelta(days=7)  # rank 0 may wait on an interactive user for a long time
GRACE_SECONDS = 5.0  # after a worker dies: time for rank 0 to notice by itself before it is stopped


@dataclass(frozen=True)
class RankSpec:
    """Everything a worker needs to build its rank's executable (JSON-serialisable)."""

    source: str  # a SAT checkpoint or a package
    backend: str
    tp_size: int
    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None
    torch_compile: bool = False
    config: str | None = None  # preset for a checkpoint without model_config.json
    address: str = "127.0.0.1"
    port: int = 0
    timeout: float = 20.0  # seconds a collective may wait for a peer

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RankSpec":
        return cls(**json.loads(text))


def collective_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_groups(rank: int, world: int, spec: RankSpec, init_method: str, local_rank: int):
    """The default group (the computation, short timeout) and a command group (long timeout).

    On GPUs the default group is NCCL, bound to this rank's GPU; commands always travel on
    gloo (pickled host arrays), so no host tensor ever reaches NCCL.
    """
    device = rank_device(spec.device, local_rank)
    extra = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        extra["device_id"] = torch.device(device)
    dist.init_process_group(collective_backend(spec.device), init_method=init_method, rank=rank,
                            world_size=world, timeout=timedelta(seconds=spec.timeout), **extra)
    command_group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return dist.group.WORLD, command_group


def build_executable(spec: RankSpec, rank: int, compute_group, local_rank: int):
    """This rank's executable, its collectives on `compute_group` (checking that every tensor
    handed to them is on the rank's device)."""
    from glmc import backends
    from glmc.api import open_source
    from glmc.config import Mapping
    from glmc.model.parallel import TorchDistributed

    mapping = Mapping(spec.tp_size, rank)
    device = rank_device(spec.device, local_rank)
    comm = TorchDistributed(mapping, compute_group, device=device)
    options = backends.CompileOptions(dtype=spec.dtype, device=device,
                                      threads=spec.threads or threads_per_rank(spec),
                                      torch_compile=spec.torch_compile)
    executable = backends.compile(spec.backend, open_source(spec.source, spec.config), mapping, options, comm)
    return executable, comm


def threads_per_rank(spec: RankSpec) -> int:
    """The machine's cores shared among the ranks: more threads than cores make every
    rank's thread pool spin against the others' (a 100x slowdown seen on 2 cores)."""
    if spec.device.startswith("cuda"):
        return 1
    return max(1, (os.cpu_count() or 1) // spec.tp_size)


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Cluster:
    """Rank 0's side of a multi-rank run.

    `spawn=True`: this process starts ranks 1..N-1 itself and watches them.
    `spawn=False`: the ranks were started by torchrun (which watches them); rank 0
    joins through torch.distributed's environment variables.
    """

    def __init__(self, spec: RankSpec, on_failure: Callable[[str], None] | None = None, spawn: bool = True):
        # Spawned ranks share this machine's GPUs; torchrun's may span machines (each checks its own).
        check_device(spec.device, spec.tp_size if spawn else 1)
        self.on_failure = on_failure
        self.failure: str | None = None
        self._closing = False
        self.workers: dict[int, subprocess.Popen] = {}
        if spawn:
            port = spec.port or free_port(spec.address)
            spec = RankSpec(**{**asdict(spec), "port": port})
            self.workers = {rank: subprocess.Popen([sys.executable, "-m", "glmc.runtime.worker", str(rank),
                                                    spec.to_json()])
                            for rank in range(1, spec.tp_size)}
            self._watcher = threading.Thread(target=self._watch, name="glmc-rank-watcher", daemon=True)
            self._watcher.start()
        self.spec = spec
        try:
            init_method = f"tcp://{spec.address}:{spec.port}" if spawn else "env://"
            self.compute_group, self.command_group = init_groups(0, spec.tp_size, spec, init_method, 0)
            local, self.comm = build_executable(spec, 0, self.compute_group, 0)
            # Every rank has loaded its weights before any computation's short timeout applies.
            dist.barrier(group=self.command_group)
        except BaseException as error:
            self.close()
            raise self.error(error) from None
        from glmc.runtime.distributed import LeaderExecutable

        self.executable = LeaderExecutable(local, self.command_group)

    def _watch(self) -> None:
        while not self._closing:
            failure = self._diagnose(exited_only=True)
            since = self._sending_since()
            if failure is None and since is not None and time.monotonic() - since > self.spec.timeout:
                failure = self._diagnose() or f"the other ranks took no command for {self.spec.timeout:g} s"
            if failure is not None and not self._closing:
                self.failure = failure
                self._stop_workers()  # rank 0's pending collective fails once its peers are gone
                deadline = time.monotonic() + GRACE_SECONDS
                while not self._closing and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not self._closing and self.on_failure is not None:
                    self.on_failure(self.failure)  # rank 0 is still stuck: let the caller end it
                return
            time.sleep(0.1)

    def _sending_since(self) -> float | None:
        # A method, so that the watcher's frame holds no reference to the executable's weights.
        executable = getattr(self, "executable", None)
        return executable.sending_since if executable is not None else None

    def error(self, error: BaseException) -> BaseException:
        """A user-facing error for a failure of the run (naming the rank when known)."""
        if isinstance(error, (KeyboardInterrupt, GlmcError)):
            return error
        time.sleep(0.2)  # a dying worker's exit status may lag its closed socket a little
        if self.failure is None:
            self.failure = self._diagnose()
        if self.failure is None:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "timeout" in reason.lower() or "timed out" in reason.lower():
                reason = f"no answer from the other ranks within {self.spec.timeout:g} s"
            self.failure = reason
        return GlmcError(f"tensor-parallel run failed: {self.failure}")

    def _diagnose(self, exited_only: bool = False) -> str | None:
        """Which worker is dead (or, unless `exited_only`, frozen), from the processes themselves."""
        for rank, process in self.workers.items():
            code = process.poll()
            if code is not None:
                return f"rank {rank} {describe_exit(code)}"
        if exited_only:
            return None
        for rank, process in self.workers.items():
            try:
                state = open(f"/proc/{process.pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state in ("T", "t"):
                return f"rank {rank} is stopped and does not answer (no reply within {self.spec.timeout:g} s)"
        return None

    def _stop_workers(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.terminate()
                try:
                    os.kill(process.pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once resumed
                except ProcessLookupError:
                    pass
        for process in self.workers.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()

    def close(self, clean: bool = True) -> None:
        """Stop every rank and leave no process behind: cleanly when the run is healthy and `clean`
        (no exception is unwinding it). An interrupted step may leave the other ranks inside a
        collective that rank 0 will never join, where no stop command reaches them: they are
        terminated at once instead of after the collective timeout."""
        if self._closing:
            return
        healthy = clean and self.failure is None and hasattr(self, "executable")  # `error()` records failures
        self._closing = True
        if healthy:
            try:
                self.executable.stop()
                for process in self.workers.values():
                    process.wait(timeout=10)
            except Exception:
                pass
        self._stop_workers()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None and watcher is not threading.current_thread():
            # No thread of the run may outlive it: at interpreter exit Python ends a daemon
            # thread inside whatever C++ call it is in (the watcher freeing the last reference
            # to a tensor), and the C++ runtime aborts the whole process.
            watcher.join()
        if dist.is_initialized():
            dist.destroy_process_group()


def set_parent_death_signal() -> None:
    """Linux: die with the parent process, so a killed rank 0 leaves no worker behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_worker(rank: int, spec: RankSpec, init_method: str | None = None, local_rank: int | None = None) -> int:
    """The body of a rank > 0: join the groups, build the rank, serve rank 0's calls.

    Started by rank 0 (`init_method` None: rank 0's address; every rank on this machine, so
    the local rank is the rank), or by torchrun ("env://", with torchrun's local rank).
    """
    local_rank = rank if local_rank is None else local_rank
    from glmc.runtime.distributed import serve

    if init_method is None:
        parent = os.getppid()
        set_parent_death_signal()
        if os.getppid() != parent:  # the parent died before the signal was armed
            return 1
    try:
        compute_group, command_group = init_groups(rank, spec.tp_size, spec,
                                                   init_method or f"tcp://{spec.address}:{spec.port}", local_rank)
        executable, _ = build_executable(spec, rank, compute_group, local_rank)
        dist.barrier(group=command_group)
        serve(executable, command_group)
        dist.destroy_process_group()
        return 0
    except KeyboardInterrupt:
        return 130
    except GlmcError as error:
        print(f"glmc: error: rank {rank}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a peer's failure ends this rank too; rank 0 reports the cause
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"glmc: rank {rank} stopped: {reason}", file=sys.stderr)
        return 1


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None. Only the CLI calls this."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank = int(os.environ["RANK"])
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    return None
