"""A static KV cache: buffers allocated for the sequence budget, written in place.

Per layer, K and V live in buffers [batch, heads, capacity, head_dim]; a step writes
its new keys and values at [length, length + new) and attends over [0, length + new),
a view of the same memory. Nothing is concatenated or copied per step, so a step's cost
grows with the past only through attention itself (gpt-fast's static cache). When a
step would pass the capacity the buffers are reallocated at twice the size (the only
copy, amortised). K is stored after rotary, as SAT caches it.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def allocate(cls, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> "StaticKVCache":
        shape = (batch, heads, max(1, capacity), head_dim)
        return cls([torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions (doubling: a step never pays for more than one copy)."""
        if length <= self.capacity:
            return
        capacity = max(length, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :self.length] = old[:, :, :self.length]
                buffers[i] = new

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s new k, v [b, heads, new, hd] after the cached ones; return the views
        [b, heads, length + new, hd] the step attends over. `advance` moves `length` after the
        last layer."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new: int) -> None:
        self.length += new

    def reorder(self, index: torch.Tensor) -> None:
        """Rows take the contents of rows `index` (beam search), in place; `index` may repeat rows."""
        if index.numel() != self.batch:  # fewer rows (a batch shrinking): new, smaller buffers
            self.keys = [k.index_select(0, index) for k in self.keys]
            self.values = [v.index_select(0, index) for v in self.values]
            return
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                live = buffer[:, :, :self.length]
                live.copy_(live.index_select(0, index))

    def tensors(self) -> list[torch.Tensor]:
        """The cached keys and values of every layer, as views [b, heads, length, hd]."""
        return [t[:, :, :self.length] for pair in zip(self.keys, self.values) for t in pair]
