"""Detokenizer: output text, streamed deltas, and the stop conditions (EOS, stop strings, token budget)."""

from __future__ import annotations

from engine.request import FinishReason
from engine.sequence import Sequence


class Detokenizer:
    """Appends sampled tokens and decides when a sequence ends.

    Text is decoded every step only for sequences that stream or carry stop strings. Streamed text holds
    back the last ``len(longest stop) - 1`` characters, so a stop string is never half-emitted.
    """

    def __init__(self, tokenizer, eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)

    def append(self, seq: Sequence, token: int) -> tuple[str, FinishReason | None]:
        """Add a sampled token; return (text to stream now, finish reason or None)."""
        if token in self.eos_ids:
            seq.finish_reason = "eos"
        else:
            seq.token_ids.append(token)
            if seq.on_token is not None or self._stops(seq):
                self._update_text(seq)
            if seq.finish_reason is None and seq.num_output >= seq.max_tokens:
                seq.finish_reason = "length"
        return self._stream(seq), seq.finish_reason

    def final_text(self, seq: Sequence) -> str:
        """The whole output text, cut at the stop string when one ended it."""
        return seq.text if seq.finish_reason == "stop" else self._decode(seq)

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    @staticmethod
    def _stops(seq: Sequence) -> list[str]:
        return [s for s in seq.request.sampling.stop if s]

    def _update_text(self, seq: Sequence) -> None:
        before = len(seq.text)
        text = self._decode(seq)
        if text.endswith("\ufffd"):  # a partial UTF-8 character waits for its next byte
            return
        cuts = [c for s in self._stops(seq) if (c := text.find(s, max(0, before - len(s) + 1))) >= 0]
        if cuts:
            text = text[:min(cuts)]
            seq.finish_reason = "stop"
        seq.text = text

    def _stream(self, seq: Sequence) -> str:
        if seq.on_token is None:
            return ""
        if seq.finish_reason is None:
            hold = max((len(s) for s in self._stops(seq)), default=1) - 1
            upto = max(seq.streamed, len(seq.text) - hold)
        else:
            seq.text = self.final_text(seq)
            upto = len(seq.text)
        delta = seq.text[seq.streamed:upto]
        seq.streamed = upto
        return delta
