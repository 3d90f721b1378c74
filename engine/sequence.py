"""Sequence: one request's tokens, cache blocks, adapter, pictures and progress through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from engine.base import TokenCallback
from engine.heads import TaskHead
from engine.model.vision import Picture
from engine.request import EngineRequest, FinishReason

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqImage:
    """One picture of a sequence: its cache key, its patches, and its embeddings once encoded."""

    image_id: str
    picture: Picture
    embeds: torch.Tensor | None = None  # [tokens, hidden] on the device


@dataclass
class SeqClock:
    """Wall-clock marks (time.time()) of a sequence's life."""

    arrived: float = field(default_factory=time.time)
    first_scheduled: float | None = None
    prefill_done: float | None = None
    finished: float | None = None
    vision_s: float = 0.0


@dataclass(eq=False)
class Sequence:
    """A request in flight. ``token_ids`` holds prompt then output; ``num_computed`` of them are in the cache."""

    request: EngineRequest
    prompt_ids: list[int]
    positions: np.ndarray  # [3, prompt_len] int64 M-RoPE positions of the prompt
    rope_delta: int  # later tokens sit at index + rope_delta on every axis
    max_tokens: int  # output budget after clipping to the context
    images: list[SeqImage] = field(default_factory=list)
    image_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # of pad tokens
    head: TaskHead | None = None
    on_token: TokenCallback | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    holds_slot: bool = False
    clock: SeqClock = field(default_factory=SeqClock)
    modes: set[str] = field(default_factory=set)
    text: str = ""  # output text decoded so far (when streaming or stop strings need it)
    streamed: int = 0  # characters of ``text`` already passed to on_token
    finish_reason: FinishReason | None = None
    head_output: dict | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def adapter(self) -> str | None:
        return self.request.adapter or (self.head.adapter if self.head is not None else None)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (1 while decoding; the rest of the prompt while prefilling)."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.remaining > 1 or self.num_computed < self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def image_embeds(self, lo: int, hi: int) -> torch.Tensor:
        """Embeddings [hi - lo, hidden] of image tokens lo..hi-1 (counted over all pictures, in prompt order)."""
        return torch.cat([img.embeds for img in self.images])[lo:hi]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    def write_positions(self, out: np.ndarray, row: int, start: int, end: int) -> None:
        """M-RoPE positions of tokens start..end-1 into ``out[:, row:row + end - start]`` (out: [3, T])."""
        split = min(max(start, self.prompt_len), end)  # first index past the prompt
        if split > start:
            out[:, row:row + split - start] = self.positions[:, start:split]
        if end > split:
            out[:, row + split - start:row + end - start] = np.arange(split + self.rope_delta, end + self.rope_delta)

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone; prompt and outputs so far are recomputed as one prefill."""
        self.num_computed = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
