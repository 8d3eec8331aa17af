"""A KV cache of fixed slots, one per running sequence, for a batch whose sequences have different lengths.

It stands in for transformers' `Cache` through the one method decoder layers call, `update(keys, values, layer)`:
a prefill writes each new prompt (a `Segment` of a row of its pass) into its slot; a decode step writes one new
position per running sequence, each at its own length. Running sequences always occupy slots 0..n-1, so the keys
a step attends over are a view, not a copy; a sequence that leaves is replaced by the last one (one slot copied).

A long prompt is prefilled in chunks (one per engine turn, between decode steps) into an extra staging slot,
each chunk attending over the chunks before it; once whole, it is copied into the next running slot. Memory is
fixed at start: (slots + 1) x capacity x layers x 2 x kv_heads x head_dim.

A prefill thread (the engine's `prefill_thread`) writes through a second front on the same memory
(`prefill_front`): into free slots above the running ones (a long prompt chunk after chunk too), while the
worker's decode steps and chunked prompts read and write the running slots and the staging one. Each front keeps
its own per-pass state; the worker then commits what the prefill thread wrote into its next running slots.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    """Where a prefill pass holds one new prompt: tokens start..start+length-1 of batch row `row`, for `slot`."""

    slot: int
    row: int
    start: int
    length: int


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_slots + 1, kv_heads, capacity, head_dim)  # the last one stages chunked prompts
        self._keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.num_slots = num_slots
        self._staging = num_slots
        self.lengths: list[int] = []  # tokens cached per running sequence, by slot
        self._device = device
        # What the next forward pass writes: the prompts of some new slots, or one position in each running slot.
        self._prefill: list[Segment] | None = None
        self._chunk: tuple[int, int, int] | None = None  # (slot, start, length) of a chunk of a long prompt
        self._positions: torch.Tensor | None = None
        self._span = 0

    def prefill_front(self) -> SlotKVCache:
        """Another front on this cache's memory, for passes that write the free slots above the running ones by
        slot number, from another thread than the decode steps' front."""
        front = copy.copy(self)
        front.lengths = [0] * (self.num_slots + 1)  # indexed by slot, for finish_step
        front._prefill, front._chunk, front._positions, front._span = None, None, None, 0
        return front

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._keys + self._values)

    def add_sequence(self) -> int:
        if len(self.lengths) >= self.num_slots:
            raise RuntimeError("no free KV slot")
        self.lengths.append(0)
        return len(self.lengths) - 1

    def remove_sequence(self, slot: int) -> None:
        """Free `slot`; the last running sequence moves into it, so callers must move their row the same way."""
        last = len(self.lengths) - 1
        if slot != last:
            length = self.lengths[last]
            for cache in (self._keys, self._values):
                for layer in cache:
                    layer[slot, :, :length] = layer[last, :, :length]
            self.lengths[slot] = length
        self.lengths.pop()

    def prepare_prefill(self, segments: list[Segment]) -> None:
        """Set up one forward pass over several new prompts, each a segment of a row (rows may hold several)."""
        self._prefill, self._positions, self._chunk = segments, None, None

    def prepare_chunk(self, start: int, length: int, slot: int | None = None) -> None:
        """Set up one forward pass over tokens start..start+length-1 of a long prompt, in `slot` (default: the
        staging slot)."""
        slot = self._staging if slot is None else slot
        self._prefill, self._positions, self._chunk = None, None, (slot, start, length)

    def commit_staged(self, length: int) -> int:
        """Move the staged prompt (its first `length` tokens, all prefilled) into a new running slot."""
        return self.commit(self._staging, length)

    def commit(self, source: int, length: int) -> int:
        """Move a prompt prefilled into slot `source` (at or above the next running slot) into a new running
        slot; returns that slot."""
        slot = self.add_sequence()
        if source != slot:
            for cache in (self._keys, self._values):
                for layer in cache:
                    layer[slot, :, :length] = layer[source, :, :length]
        self.lengths[slot] = length
        return slot

    def prepare_decode(self) -> torch.Tensor:
        """Set up one decode step for every running sequence; returns their positions (also their RoPE ids)."""
        self._prefill, self._chunk = None, None
        self._positions = torch.tensor(self.lengths, device=self._device)
        self._span = max(self.lengths) + 1
        return self._positions

    def decode_mask(self) -> torch.Tensor:
        """[rows, 1, 1, span] booleans: each row sees its own cached tokens and the one being written."""
        assert self._positions is not None
        columns = torch.arange(self._span, device=self._device)
        return (columns[None, :] <= self._positions[:, None])[:, None, None, :]

    def finish_step(self) -> None:
        if self._chunk is not None:
            self._chunk = None  # a long prompt's progress is the engine's to track
        elif self._prefill is not None:
            for segment in self._prefill:
                self.lengths[segment.slot] = segment.length
        else:
            self.lengths = [length + 1 for length in self.lengths]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if self._chunk is not None:
            # This chunk attends to the chunks before it and to itself, all in its slot.
            slot, start, length = self._chunk
            keys[slot, :, start : start + length] = key_states[0, :, :length]
            values[slot, :, start : start + length] = value_states[0, :, :length]
            end = start + length
            return keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
        if self._prefill is not None:
            # The prompts attend only to themselves: store each one's real tokens, hand the batch straight back.
            for slot, row, start, length in self._prefill:
                keys[slot, :, :length] = key_states[row, :, start : start + length]
                values[slot, :, :length] = value_states[row, :, start : start + length]
            return key_states, value_states
        assert self._positions is not None
        rows = torch.arange(len(self.lengths), device=self._device)
        keys[rows, :, self._positions] = key_states[:, :, 0]
        values[rows, :, self._positions] = value_states[:, :, 0]
        return keys[: len(rows), :, : self._span], values[: len(rows), :, : self._span]
