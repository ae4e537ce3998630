"""Start, watch and stop the ranks of a tensor-parallel run.

`glmc run --tp N` (and `glmc.load(..., tp_size=N)`) makes the calling process rank 0
and starts ranks 1..N-1 as worker processes (`python -m glmc.runtime.worker`), each
loading only its own rank. Under torchrun every process is started by torchrun,
which also watches them.

The ranks meet at a TCP store (rank 0's for spawned workers, torchrun's otherwise).
Start-up runs in stages that rank 0 waits for by polling the store, never inside one
long blocking call: every worker joins, then every rank loads its weights. While a
worker starts and loads, a heartbeat thread of its own counts in the store; rank 0
stops the run as soon as a worker exits or is stopped (spawned workers: their process
state) or shows no heartbeat for the collective timeout, and Ctrl-C reaches it at
once. After start-up, the collectives time out (default 20 s) when a rank hangs,
a watcher thread notices a worker that exits (crash, kill), workers die with rank 0
(PR_SET_PDEATHSIG), and an error or Ctrl-C that interrupts rank 0 mid-step
terminates them; every failure is reported as one line naming the rank and the cause.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from glmc.devices import check_device, rank_device
from glmc.errors import GlmcError
from glmc.run_spec import RunSpec

COMMAND_TIMEOUT = timedelta(days=7)  # rank 0 may wait on an interactive user for a long time
GRACE_SECONDS = 5.0  # after a worker dies: time for rank 0 to notice by itself before it is stopped
HEARTBEAT_SECONDS = 0.5  # a starting worker counts in the store this often
POLL_SECONDS = 0.05  # rank 0 looks at the store and the workers this often while they start


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet: a TCP store at `address:port`, served by this process when `host`
    (rank 0 of spawned workers; rank 0 under torchrun unless torchrun's agent serves it)."""

    address: str
    port: int
    host: bool = False


def connect(rendezvous: Rendezvous, timeout: float) -> dist.TCPStore:
    """The store itself; glmc's keys live under the prefixes "glmc/run" (start-up stages,
    heartbeats) and "glmc/groups" (the process groups), apart from torchrun's own."""
    return dist.TCPStore(rendezvous.address, rendezvous.port, is_master=rendezvous.host,
                         timeout=timedelta(seconds=timeout), wait_for_workers=False)


def collective_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_groups(rank: int, world: int, spec: RunSpec, store: dist.Store, local_rank: int):
    """The default group (the computation, short timeout) and a command group (long timeout).

    On GPUs the default group is NCCL, bound to this rank's GPU; commands always travel on
    gloo (pickled host arrays), so no host tensor ever reaches NCCL.
    """
    device = rank_device(spec.device, local_rank)
    extra = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        extra["device_id"] = torch.device(device)
    dist.init_process_group(collective_backend(spec.device), store=dist.PrefixStore("glmc/groups", store),
                            rank=rank, world_size=world, timeout=timedelta(seconds=spec.collective_timeout),
                            **extra)
    command_group = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return dist.group.WORLD, command_group


def rank_spec(spec: RunSpec, local_rank: int) -> RunSpec:
    """The spec of one rank: its own device, and its share of the machine's cores."""
    return dataclasses.replace(spec, device=rank_device(spec.device, local_rank),
                               threads=spec.threads or threads_per_rank(spec))


def build_executable(spec: RunSpec, rank: int, compute_group, local_rank: int, progress=None):
    """This rank's executable, its collectives on `compute_group` (checking that every tensor
    handed to them is on the rank's device)."""
    from glmc import backends
    from glmc.config import Mapping
    from glmc.model.parallel import TorchDistributed

    mapping = Mapping(spec.tp_size, rank)
    mine = rank_spec(spec, local_rank)
    comm = TorchDistributed(mapping, compute_group, device=mine.device)
    return backends.open_rank(mine, mapping, comm, progress=progress), comm


def threads_per_rank(spec: RunSpec) -> int:
    """The machine's cores shared among the ranks: more threads than cores make every
    rank's thread pool spin against the others' (a 100x slowdown seen on 2 cores)."""
    if spec.device_kind == "cuda":
        return 1
    return max(1, (os.cpu_count() or 1) // spec.tp_size)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Heartbeat:
    """A worker's sign of life while it starts: a counter in the store, bumped by a thread of
    its own, which keeps counting while the main thread loads weights (or imports torch)."""

    def __init__(self, store: dist.Store, rank: int):
        self.store, self.key = store, f"beat/{rank}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="glmc-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self.store.add(self.key, 1)
            except Exception:  # the store is gone with rank 0: nothing left to tell
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Cluster:
    """Rank 0's side of a multi-rank run.

    `spawn=True`: this process starts ranks 1..N-1 itself, serves their store and watches
    them. `spawn=False`: the ranks were started by torchrun (which watches them); rank 0
    meets them at `rendezvous`.
    """

    def __init__(self, spec: RunSpec, on_failure: Callable[[str], None] | None = None, spawn: bool = True,
                 rendezvous: Rendezvous | None = None, progress: Callable[[str], None] | None = None):
        # Spawned ranks share this machine's GPUs; torchrun's may span machines (each checks its own).
        check_device(spec.device, spec.tp_size if spawn else 1)
        self.spec = spec
        self.on_failure = on_failure
        self.failure: str | None = None
        self._closing = False
        self.workers: dict[int, subprocess.Popen] = {}
        try:
            if spawn:
                rendezvous = Rendezvous("127.0.0.1", 0, host=True)
            tcp = connect(rendezvous, spec.collective_timeout)
            self.store = dist.PrefixStore("glmc/run", tcp)
            if spawn:
                port = str(tcp.port)  # a port 0 store listens on one the system chose
                self.workers = {rank: subprocess.Popen([sys.executable, "-m", "glmc.runtime.worker", str(rank),
                                                        spec.to_json(), rendezvous.address, port])
                                for rank in range(1, spec.tp_size)}
                self._watcher = threading.Thread(target=self._watch, name="glmc-rank-watcher", daemon=True)
                self._watcher.start()
            self._await("joined", "starting")
            self.compute_group, self.command_group = init_groups(0, spec.tp_size, spec, tcp, 0)
            local, self.comm = build_executable(spec, 0, self.compute_group, 0, progress)
            # Every rank has loaded its weights before any computation's short timeout applies.
            self._await("loaded", "loading its weights")
        except BaseException as error:
            self.close()
            raise self.error(error) from None
        from glmc.runtime.distributed import LeaderExecutable

        self.executable = LeaderExecutable(local, self.command_group)

    def _await(self, stage: str, doing: str) -> None:
        """Wait until every other rank has reached `stage`, polling: Ctrl-C is seen at once, and a
        rank that exits, is stopped or shows no sign of life for the collective timeout ends it."""
        timeout = self.spec.collective_timeout
        waiting = set(range(1, self.spec.tp_size))
        beats = {rank: (-1, time.monotonic()) for rank in waiting}  # last count seen, and when it changed
        while True:
            waiting = {rank for rank in waiting if not self.store.check([f"{stage}/{rank}"])}
            if not waiting:
                return
            failure = self.failure or self._diagnose()
            now = time.monotonic()
            for rank in sorted(waiting):
                count = self.store.add(f"beat/{rank}", 0)
                seen, since = beats[rank]
                if count != seen:
                    beats[rank] = (count, now)
                elif failure is None and now - since > timeout:
                    failure = f"rank {rank} showed no sign of life for {timeout:g} s while {doing}"
            if failure is not None:
                self.failure = failure
                raise GlmcError(f"tensor-parallel run failed: {failure}")
            time.sleep(POLL_SECONDS)

    def _watch(self) -> None:
        while not self._closing:
            failure = self._diagnose(exited_only=True)
            since = self._sending_since()
            if failure is None and since is not None and time.monotonic() - since > self.spec.collective_timeout:
                failure = self._diagnose() or f"the other ranks took no command for {self.spec.collective_timeout:g} s"
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
                reason = f"no answer from the other ranks within {self.spec.collective_timeout:g} s"
            self.failure = reason
        return GlmcError(f"tensor-parallel run failed: {self.failure}")

    def _diagnose(self, exited_only: bool = False) -> str | None:
        """Which worker is dead (or, unless `exited_only`, stopped), from the processes themselves."""
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
                return f"rank {rank} is stopped and does not answer"
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
                process.wait()

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


def run_worker(rank: int, spec: RunSpec, rendezvous: Rendezvous, local_rank: int | None = None,
               spawned: bool = True) -> int:
    """The body of a rank > 0: meet the others, build the rank, serve rank 0's calls.

    Started by rank 0 (`spawned`: every rank on this machine, so the local rank is the rank),
    or by torchrun (with torchrun's local rank).
    """
    local_rank = rank if local_rank is None else local_rank
    from glmc.runtime.distributed import serve

    if spawned:
        parent = os.getppid()
        set_parent_death_signal()
        if os.getppid() != parent:  # the parent died before the signal was armed
            return 1
    try:
        tcp = connect(rendezvous, spec.collective_timeout)
        store = dist.PrefixStore("glmc/run", tcp)
        heartbeat = Heartbeat(store, rank)
        store.set(f"joined/{rank}", "1")
        compute_group, command_group = init_groups(rank, spec.tp_size, spec, tcp, local_rank)
        executable, _ = build_executable(spec, rank, compute_group, local_rank)
        store.set(f"loaded/{rank}", "1")
        heartbeat.stop()
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


def torchrun_rank() -> tuple[int, int, int, Rendezvous] | None:
    """(rank, world size, local rank, rendezvous) when started by torchrun, else None. Only the CLI
    calls this: it reads torchrun's environment (the store torchrun's agent serves, unless
    TORCHELASTIC_USE_AGENT_STORE says rank 0 serves it, as torch's env:// does)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank = int(os.environ["RANK"])
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        rendezvous = Rendezvous(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                                host=rank == 0 and not agent_store)
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)), rendezvous
    return None
