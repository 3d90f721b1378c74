"""Sampler: the next token of each sequence from its logits (greedy, or temperature with nucleus top-p)."""

from __future__ import annotations

import torch

from engine.sequence import Sequence


class Sampler:
    """Greedy rows in one argmax; sampled rows each draw from their own seeded generator (reproducible)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits: [n, vocab] fp32 -> [n] int64 token ids on the logits' device (queued, no host sync)."""
        tokens = logits.argmax(dim=-1)  # [n]
        sampled = [i for i, s in enumerate(seqs) if s.request.sampling.temperature > 0]
        if sampled:
            tokens = tokens.clone()
            for i in sampled:
                tokens[i] = self._draw(logits[i], seqs[i])
        return tokens

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def _draw(self, logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
        sp = seq.request.sampling
        probs = torch.softmax(logits / sp.temperature, dim=-1)  # [vocab]
        if sp.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < sp.top_p  # smallest prefix whose mass reaches top_p
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self._generator(seq, probs.device))[0]

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            seed = seq.request.sampling.seed
            gen = torch.Generator(device=device).manual_seed(seed if seed is not None else self.seed + seq.seq_id)
            self._generators[seq.seq_id] = gen
        return gen
