"""Tensor-parallel execution, FasterTransformer-style: rank 0 leads, every rank computes.

Rank 0 runs generation (tokenizing, sampling, beams, I/O) on a `LeaderExecutable`:
each `prefill`, `decode`, `reorder_cache` and `join_caches` call is broadcast to the other ranks,
which run the same call on their own executable (their heads, their vocabulary
rows, their KV cache) inside `serve`. The backends' collectives (all-reduce after
the row-parallel matmuls, all-gather of the logits) join the ranks during the call;
every rank ends with the full logits, and rank 0 returns them.

Commands travel on a group with a long timeout (an interactive user may think for
minutes); the computation's collectives use a group with a short one, so that a
rank that dies or hangs stops the others within it.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

PREFILL, DECODE, REORDER, JOIN, STOP = "prefill", "decode", "reorder", "join", "stop"


@dataclass
class CacheHandle:
    """Rank 0's view of a KV cache that every rank holds its share of."""

    id: int
    local: object  # rank 0's own share


def _host(t: torch.Tensor) -> np.ndarray:
    # Commands travel as pickles on the (gloo) command group, never through NCCL: the
    # other ranks move the arrays to their own device.
    return t.detach().cpu().numpy()


class LeaderExecutable:
    """Rank 0's executable: broadcasts each call, then runs its own share of it.

    One call at a time: two threads interleaving their broadcasts and collectives would
    pair one thread's command with another's tensors on the other ranks."""

    def __init__(self, local, command_group):
        self.local, self.group = local, command_group
        self._lock = threading.Lock()
        self.config = local.config
        self.mapping = local.mapping
        self.device, self.dtype = local.device, local.dtype
        self._ids = itertools.count()
        self._released: list[int] = []  # caches rank 0 no longer holds; the others drop them on the next call
        # When the current command broadcast began (None: not sending). The command group's
        # timeout is long, so the watcher uses this to notice a rank that stopped listening.
        self.sending_since: float | None = None

    def _send(self, command: str, *args) -> None:
        released, self._released = self._released, []
        self.sending_since = time.monotonic()
        try:
            dist.broadcast_object_list([(command, args, released)], src=0, group=self.group)
        finally:
            self.sending_since = None

    def _handle(self, handle_id: int, local_cache) -> CacheHandle:
        handle = CacheHandle(handle_id, local_cache)
        weakref.finalize(handle, self._released.append, handle_id)
        return handle

    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True, capacity: int | None = None):
        with self._lock:
            handle_id = next(self._ids)
            self._send(PREFILL, handle_id, _host(tokens), _host(position_ids), _host(attention_mask), last_only,
                       capacity)
            logits, cache = self.local.prefill(tokens, position_ids, attention_mask, last_only=last_only,
                                               capacity=capacity)
            return logits, self._handle(handle_id, cache)

    def decode(self, tokens, position_ids, attention_mask, cache: CacheHandle):
        with self._lock:
            handle_id = next(self._ids)
            self._send(DECODE, handle_id, cache.id, _host(tokens), _host(position_ids), _host(attention_mask))
            logits, local = self.local.decode(tokens, position_ids, attention_mask, cache.local)
            return logits, self._handle(handle_id, local)

    def reorder_cache(self, cache: CacheHandle, index: torch.Tensor) -> CacheHandle:
        with self._lock:
            handle_id = next(self._ids)
            self._send(REORDER, handle_id, cache.id, _host(index))
            return self._handle(handle_id, self.local.reorder_cache(cache.local, index))

    def join_caches(self, caches: list[CacheHandle], capacity: int, skip: list[int] | None = None) -> CacheHandle:
        with self._lock:
            handle_id = next(self._ids)
            self._send(JOIN, handle_id, [c.id for c in caches], capacity, skip)
            return self._handle(handle_id, self.local.join_caches([c.local for c in caches], capacity, skip))

    def cache_length(self, cache: CacheHandle) -> int:
        return self.local.cache_length(cache.local)

    def cache_tensors(self, cache: CacheHandle) -> list[torch.Tensor]:
        return self.local.cache_tensors(cache.local)

    def stop(self) -> None:
        with self._lock:
            self._send(STOP)


def serve(executable, command_group) -> None:
    """The loop of ranks > 0: run rank 0's calls on this rank's executable until it stops."""
    caches: dict[int, object] = {}
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=command_group)
        command, args, released = message[0]
        for handle_id in released:
            caches.pop(handle_id, None)
        if command == STOP:
            return
        if command == PREFILL:
            handle_id, tokens, positions, mask, last_only, capacity = args
            _, caches[handle_id] = executable.prefill(torch.from_numpy(tokens), torch.from_numpy(positions),
                                                      torch.from_numpy(mask), last_only=last_only,
                                                      capacity=capacity)
        elif command == DECODE:
            handle_id, source, tokens, positions, mask = args
            _, caches[handle_id] = executable.decode(torch.from_numpy(tokens), torch.from_numpy(positions),
                                                     torch.from_numpy(mask), caches[source])
        elif command == REORDER:
            handle_id, source, index = args
            caches[handle_id] = executable.reorder_cache(caches[source], torch.from_numpy(index))
        elif command == JOIN:
            handle_id, sources, capacity, skip = args
            caches[handle_id] = executable.join_caches([caches[s] for s in sources], capacity, skip)
        else:
            raise RuntimeError(f"unknown command {command!r} from rank 0")
