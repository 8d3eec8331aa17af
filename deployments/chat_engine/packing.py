"""How a prefill pass lays out a wave of prompts: rows as wide as the longest prompt, each holding as many of the
shorter ones as fit beside each other.

Padding is computed like real tokens. One prompt per row, a wave of prompts of mixed lengths spends a quarter to a
third of its pass on padding (the chat benchmark's 37-128-token prompts, waves of 4-16); packed, 15-20%. A row's
prompts are kept apart by the attention mask (each sees only itself, causally) and their positions (each counts
from 0), so a prompt's keys, values and logits are what a row of its own would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deployments.chat_engine.slot_cache import Segment


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """The prompts' indices in each row of width max(lengths): longest first, each in the first row with room
    left for it (first-fit decreasing)."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if row is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return rows


@dataclass
class PackedPrefill:
    """The inputs of one prefill pass over `prompts`, whose KV caches go to `slots` (one each, in order)."""

    prompts: list[list[int]]
    slots: list[int]
    segments: list[Segment] = field(init=False)  # where each prompt sits, by prompt
    tokens: list[list[int]] = field(init=False)
    positions: list[list[int]] = field(init=False)
    owners: list[list[int]] = field(init=False)  # the prompt of each token; -1: padding

    def __post_init__(self) -> None:
        self.tokens, self.positions, self.owners = [], [], []
        by_prompt: dict[int, Segment] = {}
        width = max(len(p) for p in self.prompts)
        for row, members in enumerate(pack_rows([len(p) for p in self.prompts])):
            tokens: list[int] = []
            positions: list[int] = []
            owners: list[int] = []
            for i in members:
                prompt = self.prompts[i]
                by_prompt[i] = Segment(self.slots[i], row, len(tokens), len(prompt))
                tokens += prompt
                positions += range(len(prompt))
                owners += [i] * len(prompt)
            # The padding is a segment of its own: every query sees at least itself, and no prompt sees it.
            padding = width - len(tokens)
            self.tokens.append(tokens + [0] * padding)
            self.positions.append(positions + list(range(padding)))
            self.owners.append(owners + [-1] * padding)
        self.segments = [by_prompt[i] for i in range(len(self.prompts))]

    def positions_and_mask(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids [rows, width], the mask [rows, 1, width, width]: each prompt sees itself, causally)."""
        positions = torch.tensor(self.positions, device=device)
        owners = torch.tensor(self.owners, device=device)
        same_prompt = owners[:, :, None] == owners[:, None, :]  # [row, query, key]
        causal = positions[:, None, :] <= positions[:, :, None]
        return positions, (same_prompt & causal)[:, None, :, :]

    def last_positions(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's last token (rows, columns), in the prompts' order: where its next-token logits come from."""
        rows = torch.tensor([s.row for s in self.segments], device=device)
        columns = torch.tensor([s.start + s.length - 1 for s in self.segments], device=device)
        return rows, columns
