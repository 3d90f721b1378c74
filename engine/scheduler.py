"""Scheduler: continuous batching under a token budget, chunked prefill, preemption by recompute, adapter slots."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from engine.adapter_store import AdapterError
from engine.block_manager import BlockManager
from engine.lora.manager import LoRAManager, SlotStatus
from engine.policy import ModeDecision
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``start .. start + count - 1`` of ``seq`` are computed (and cached) this iteration."""

    seq: Sequence
    start: int
    count: int

    @property
    def completes(self) -> bool:
        """Whether the chunk reaches the end of the sequence's known tokens (so a token or head follows)."""
        return self.start + self.count == self.seq.num_tokens


@dataclass
class ScheduleOutput:
    """The scheduler's hand-off to the runner: what runs this iteration, and how."""

    chunks: list[ScheduledChunk] = field(default_factory=list)  # decode chunks first, then prefill chunks
    mode: str = "unmerged"  # the policy's mode; results report it
    merged_adapter: str | None = None  # adapter folded into the base weights (merged / mixture)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this iteration
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # failed on admission (bad adapter files)
    started_at: float = field(default_factory=time.time)  # when the iteration was formed (queue-time end)

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        """One token per sequence, all past prefill: the CUDA-graph case."""
        return bool(self.chunks) and all(c.count == 1 and c.start >= c.seq.prompt_len for c in self.chunks)


class ModeSource(Protocol):
    """Decides each iteration's mode (the orchestrator), given the running and waiting sequences."""

    def decide(self, running: list[Sequence], waiting: deque[Sequence]) -> ModeDecision: ...


class Scheduler:
    """Running sequences first (oldest first), then waiting ones in arrival order while budget and memory last.

    Sequences the mode decision holds back are skipped (running ones keep their cache blocks).
    """

    def __init__(self, blocks: BlockManager, lora: LoRAManager, modes: ModeSource, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.blocks, self.lora, self.modes = blocks, lora, modes
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.watermark = max(1, blocks.num_blocks // 100)  # blocks kept free for running decodes
        self.num_preemptions = 0
        self.num_added = 0  # requests ever added (a decision made before the latest one is stale)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.num_added += 1
        if seq.adapter is not None:
            self.lora.prefetch(seq.adapter)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, decision: ModeDecision | None = None) -> ScheduleOutput:
        """The next iteration under ``decision`` (None: ask the mode source now)."""
        if decision is None:
            decision = self.modes.decide(self.running, self.waiting)
        out = ScheduleOutput(mode=decision.mode, merged_adapter=decision.merged_adapter)
        budget = self._schedule_running(out, self.max_tokens, decision)
        if not out.preempted:
            self._admit_waiting(out, budget, decision)
        out.chunks.sort(key=lambda c: c.count > 1 or c.start < c.seq.prompt_len)  # decodes first
        if not out.chunks and not out.failed:
            self._unblock(out, decision)
        self._prefetch_queued()
        return out

    def can_continue(self, seqs: list[Sequence]) -> bool:
        """Whether the decode step after the current one (whose tokens are still on the device) can be ``seqs``,
        as far as the batch itself goes (``admits_waiting`` asks about the queue once the mode is decided).

        Only when ``seqs`` are all the running sequences, none can finish by length at the current step, and the
        cache has the blocks for one more token each.
        """
        if len(self.running) != len(seqs) or {id(s) for s in self.running} != {id(s) for s in seqs}:
            return False
        if any(s.num_output + 1 >= s.max_tokens or s.is_finished for s in seqs):
            return False
        return sum(self.blocks.blocks_needed(s, 2) for s in seqs) <= self.blocks.num_free

    def admits_waiting(self, decision: ModeDecision) -> bool:
        """Whether a waiting request could join the next iteration under ``decision`` (held ones cannot)."""
        return len(self.running) < self.max_num_seqs and any(decision.admits(s) for s in self.waiting)

    def continue_decode(self, seqs: list[Sequence], decision: ModeDecision) -> ScheduleOutput:
        """That next step (after ``can_continue``): one row just past each sequence's known tokens."""
        for seq in seqs:
            self.blocks.grow(seq, 2)  # the current step's token and the next one
        return ScheduleOutput(chunks=[ScheduledChunk(s, s.num_tokens, 1) for s in seqs], mode=decision.mode,
                              merged_adapter=decision.merged_adapter)

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or failed) sequence out, returning its blocks and adapter slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _chunk_size(self, seq: Sequence, budget: int) -> int:
        count = min(seq.remaining, budget)
        if seq.head is not None and count < seq.remaining:
            # The last chunk must hold every position the head reads.
            count = min(count, seq.remaining - seq.head.positions)
        return max(count, 0)

    def _schedule_running(self, out: ScheduleOutput, budget: int, decision: ModeDecision) -> int:
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            count = self._chunk_size(seq, budget) if decision.admits(seq) else 0
            if count == 0:
                idx += 1
                continue
            while not self.blocks.can_grow(seq, count):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq, count)
                out.chunks.append(ScheduledChunk(seq, seq.num_computed, count))
                budget -= count
                idx += 1
        return budget

    def _admit_waiting(self, out: ScheduleOutput, budget: int, decision: ModeDecision) -> None:
        blocked_on_slot = False  # then later adapter requests wait too, so busy slots drain (no starvation)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not decision.admits(seq) or (seq.adapter is not None and blocked_on_slot):
                continue
            count = self._chunk_size(seq, budget)
            reserve = self.watermark if self.running else 0
            if count == 0 or not self.blocks.can_grow(seq, count, reserve):
                break
            status = self._hold_slot(seq, out)
            if status is None:
                continue
            if status is not SlotStatus.READY:
                blocked_on_slot |= status is SlotStatus.NO_SLOT
                continue
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            self.blocks.grow(seq, count)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, count))
            budget -= count

    def _hold_slot(self, seq: Sequence, out: ScheduleOutput) -> SlotStatus | None:
        """READY once the sequence holds its adapter's slot; None if the adapter failed to load."""
        if seq.adapter is None or seq.holds_slot:
            return SlotStatus.READY
        try:
            status = self.lora.acquire(seq.adapter)
        except AdapterError as exc:
            self.waiting.remove(seq)
            out.failed.append((seq, str(exc)))
            return None
        seq.holds_slot = status is SlotStatus.READY
        return status

    def _prefetch_queued(self, depth: int = 8) -> None:
        """Adapters of the next queued requests move into empty device slots while they wait."""
        for seq in itertools.islice(self.waiting, depth):
            if seq.adapter is not None and not seq.holds_slot:
                self.lora.prefetch_to_device(seq.adapter)

    def _unblock(self, out: ScheduleOutput, decision: ModeDecision) -> None:
        """Nothing ran: wait for an adapter read, or fail the oldest request if it can never be scheduled."""
        if self.lora.loads_in_flight():
            self.lora.wait_for_load()
            return
        seq = next((s for s in self.waiting if decision.admits(s)), None)
        if seq is not None and not self.running:
            self.waiting.remove(seq)
            reason = (f"adapter {seq.adapter!r} cannot get a slot: every one of the {self.lora.pool.num_slots} "
                      "slots is pinned" if seq.adapter and not seq.holds_slot else "it does not fit the KV cache")
            out.failed.append((seq, f"request cannot be scheduled: {reason}"))

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting sequence %d (%d tokens) for lack of KV blocks", seq.seq_id, seq.num_tokens)
        self.running.remove(seq)
        self._release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        if seq.holds_slot and seq.adapter is not None:
            self.lora.release(seq.adapter)
        seq.holds_slot = False
