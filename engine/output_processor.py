"""OutputProcessor: applies an iteration's tokens and head answers to its sequences and emits finished results."""

from __future__ import annotations

import logging
import time

from engine.detokenizer import Detokenizer
from engine.model_runner import RunOutput
from engine.request import EngineResult, Timings
from engine.sampler import Sampler
from engine.scheduler import ScheduleOutput, Scheduler
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


class OutputProcessor:
    """Advances sequences after a step: cache progress, new tokens, streaming, stop checks, results."""

    def __init__(self, scheduler: Scheduler, detokenizer: Detokenizer, sampler: Sampler, engine_id: str) -> None:
        self.scheduler, self.detok, self.sampler, self.engine_id = scheduler, detokenizer, sampler, engine_id

    def process(self, sched: ScheduleOutput, out: RunOutput | None) -> list[EngineResult]:
        now = time.time()
        results = [self.fail(seq, error) for seq, error in sched.failed]
        for chunk in sched.chunks:
            seq = chunk.seq
            if seq.is_finished:  # stopped at the step before this overlapped one: its extra token is dropped
                continue
            seq.num_computed += chunk.count
            seq.modes.add(sched.mode)
            if seq.clock.first_scheduled is None:
                seq.clock.first_scheduled = sched.started_at
            if seq.clock.prefill_done is None and seq.num_computed >= seq.prompt_len:
                seq.clock.prefill_done = now
            if out is not None and seq.seq_id in out.head_outputs:
                seq.head_output = out.head_outputs[seq.seq_id]
                seq.finish_reason = "head"
            elif out is not None and seq.seq_id in out.tokens:
                delta, _ = self.detok.append(seq, out.tokens[seq.seq_id])
                if delta and seq.on_token is not None:
                    seq.on_token(seq.request.request_id, delta)
            if seq.finish_reason is not None:
                results.append(self.finish(seq))
        return results

    def fail(self, seq: Sequence, error: str) -> EngineResult:
        """The error result of a sequence that its own bad input stopped."""
        seq.finish_reason = "error"
        result = self.finish(seq)
        result.error = error
        return result

    def finish(self, seq: Sequence) -> EngineResult:
        self.scheduler.finish(seq)
        self.sampler.forget(seq)
        for image in seq.images:
            image.embeds = None  # the vision cache keeps what is worth keeping
        clock = seq.clock
        clock.finished = time.time()
        first = clock.first_scheduled or clock.finished
        prefill_done = clock.prefill_done or clock.finished
        timings = Timings(
            queue_ms=(first - clock.arrived) * 1000.0,
            vision_ms=clock.vision_s * 1000.0,
            prefill_ms=max(0.0, (prefill_done - first) * 1000.0 - clock.vision_s * 1000.0),
            decode_ms=(clock.finished - prefill_done) * 1000.0,
            e2e_ms=(clock.finished - seq.request.created_at) * 1000.0,
        )
        text = "" if seq.finish_reason in ("head", "error") else self.detok.final_text(seq)
        return EngineResult(
            request_id=seq.request.request_id, text=text, head_output=seq.head_output,
            prompt_tokens=seq.prompt_len, output_tokens=seq.num_output, token_ids=seq.output_ids,
            finish_reason=seq.finish_reason,
            mode="+".join(sorted(seq.modes)) or "unmerged", adapter=seq.adapter, engine_id=self.engine_id,
            timings=timings, meta=seq.request.meta,
        )

