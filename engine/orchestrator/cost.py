"""CostModel: what a weight switch, an iteration and its multi-LoRA work cost, measured on this machine.

The switch cost and the multi-LoRA op's cost coefficients are measured at start-up; the base iteration costs
start from a measured prior and then follow the engine's measured steps (exponential moving averages).

Two regimes: decode iterations run as CUDA-graph replays on a GPU, so their multi-LoRA cost is device time
(the coefficients); prefill iterations too when the engine runs them as piecewise graphs (engine/prefill_graph.py,
the GPU default up to ``prefill_graph_tokens``); otherwise they run eagerly, where the op's host-side launches
(checks, tile lookup, two Triton launches per projection and layer) cost milliseconds whatever the rows
(``eager_lora_s``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.device import median_time
from engine.lora.ops import graph_safe
from engine.lora.pool import AdapterPool
from engine.model.layers import AdaptedLinear
from kernels.backend import LoRABackend
from kernels.lora_batch import LoRABatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """The rows one adapter group puts into an iteration: how many input rows, at which rank."""

    tokens: int
    rank: int


Composition = Mapping[str | None, Load]  # adapter (None: no plain adapter) -> its rows this iteration


@dataclass
class CostModel:
    """Seconds, for the whole model (all layers)."""

    switch_s: float  # one swift-merge launch: merge, unmerge or M1 -> M2
    lora_launch_s: float  # the multi-LoRA op in an iteration that has any adapter row
    lora_segment_rank_s: float  # per segment and unit of its rank: reading the terms' A and B
    lora_token_rank_s: float  # per row and unit of rank: shrink + expand FLOPs
    decode_step_s: float  # an iteration of decode rows only, LoRA work excluded
    prefill_token_s: float  # each prefill row on top of that
    prefill_base_s: float = 0.0  # an iteration with prefill rows, beyond its rows' cost (an eager forward's host work)
    eager_lora_s: float = 0.0  # the op in an eagerly run iteration (prefill), at least: host launch overhead
    mixture_launch_s: float = 0.0  # what a two-term (mixture) launch costs beyond its terms' segment and row costs
    iteration_s: float = 0.0  # a typical iteration as served lately, everything included (0: none measured)
    smoothing: float = 0.2  # weight of a new measurement in the moving averages
    # exponentially forgotten sums over prefill iterations (weight, Σtokens, Σseconds, Σtokens², Σtokens·seconds)
    prefill_fit: list[float] = field(default_factory=lambda: [0.0] * 5)

    def lora_s(self, comp: Composition, merged: str | None, merged_rank: int = 0) -> float:
        """Estimated multi-LoRA seconds of an iteration with rows ``comp`` while ``merged`` is in the weights.

        Unmerged: a segment per adapter at its rank. With M merged: M's rows cost nothing; every other row
        (other adapters, and rows with no plain adapter) computes its own terms plus -M, in one launch, whose
        two-term kernels cost ``mixture_launch_s`` more.
        """
        segments = []
        for adapter, load in comp.items():
            if load.tokens == 0 or (merged is not None and adapter == merged):
                continue
            rank = (load.rank if adapter is not None else 0) + (merged_rank if merged is not None else 0)
            if rank:
                segments.append((load.tokens, rank))
        if not segments:
            return 0.0
        return (self.lora_launch_s + (self.mixture_launch_s if merged is not None else 0.0)
                + sum(r for _, r in segments) * self.lora_segment_rank_s
                + sum(t * r for t, r in segments) * self.lora_token_rank_s)

    @property
    def typical_iteration_s(self) -> float:
        """The measured typical iteration, or the decode-step estimate before any was measured."""
        return self.iteration_s or self.decode_step_s

    def step_s(self, decode_rows: int, prefill_tokens: int) -> float:
        """Base seconds of an iteration (LoRA work excluded)."""
        decode = self.decode_step_s if decode_rows or not prefill_tokens else 0.0
        return decode + (self.prefill_base_s + prefill_tokens * self.prefill_token_s if prefill_tokens else 0.0)

    def observe(self, decode_rows: int, prefill_tokens: int, lora_s: float, elapsed_s: float,
                mode: str = "unmerged") -> None:
        """Fold a measured iteration into the base-cost averages (its estimated LoRA share taken out).

        ``lora_s``: the decode-regime estimate (``lora_s``); an iteration with prefill rows ran eagerly, so its
        LoRA share is at least ``eager_lora_s`` when it had any. A mixture-mode decode step (two-term launches)
        corrects ``mixture_launch_s`` by what the model left unexplained instead: the start-up timing of one
        small two-term launch measured nothing extra on an H200, while served mixture steps took ~1 ms more
        than unmerged ones of as many rows.
        """
        if prefill_tokens and lora_s > 0.0:
            lora_s = max(lora_s, self.eager_lora_s)
        base = max(elapsed_s - lora_s, 0.0)
        a = self.smoothing
        last = self.iteration_s or elapsed_s
        self.iteration_s = last + a * (elapsed_s - last)
        if prefill_tokens == 0 and decode_rows and mode == "mixture" and lora_s > 0.0:
            self.mixture_launch_s = max(self.mixture_launch_s + a * (base - self.decode_step_s), 0.0)
        elif prefill_tokens == 0 and decode_rows:
            self.decode_step_s += a * (base - self.decode_step_s)
        elif prefill_tokens >= 16:
            self._fit_prefill(prefill_tokens, max(base - (self.decode_step_s if decode_rows else 0.0), 0.0))

    def _fit_prefill(self, tokens: int, seconds: float) -> None:
        """Least squares of seconds = prefill_base_s + tokens x prefill_token_s over recent prefill iterations
        (each older one weighs 1 - smoothing less). With too little spread in their token counts to separate the
        two, the base stays and the per-token cost takes the rest."""
        keep = 1.0 - self.smoothing
        w, sx, sy, sxx, sxy = (v * keep for v in self.prefill_fit)
        w, sx, sy, sxx, sxy = self.prefill_fit = [w + 1.0, sx + tokens, sy + seconds, sxx + tokens * tokens,
                                                  sxy + tokens * seconds]
        mx, my = sx / w, sy / w
        var, cov = sxx / w - mx * mx, sxy / w - mx * my
        if var > (0.25 * mx) ** 2 and cov > 0.0 and my - cov / var * mx >= 0.0:
            self.prefill_token_s, self.prefill_base_s = cov / var, my - cov / var * mx
        else:
            self.prefill_token_s = max(my - self.prefill_base_s, 0.0) / mx


@torch.inference_mode()
def calibrate(linears: dict[tuple[int, str], AdaptedLinear], pool: AdapterPool, op: LoRABackend,
              switch_s: float, reps: int = 5, graphs: bool = True, prefill_graphs: bool = False) -> CostModel:
    """Time the multi-LoRA op and the base matmuls on layer 0's projections; scale to every layer.

    Three op timings at the pool's max rank R (scale 0 on whatever the slots hold) pin down the launch,
    per-segment and per-row coefficients: (8 rows, 1 adapter), (8 rows, 8 adapters), (512 rows, 1 adapter); a
    fourth, (8 rows, 8 adapters) in mixture mode (adapter 0 merged: the other rows carry two terms), gives what a
    two-term launch costs beyond what those coefficients predict for it.
    With ``graphs`` on a GPU and a graph-safe op they, and the base decode prior, are timed as CUDA-graph
    replays, the way decode steps run; the eager time of the first case is ``eager_lora_s`` (prefill), unless
    ``prefill_graphs`` says prefill iterations are graph replays too (then it is the first case's replay time).
    """
    layer0 = {key: lin for key, lin in linears.items() if key[0] == 0}
    layers = 1 + max(key[0] for key in linears)
    rank = pool.layout.max_rank
    device, dtype = pool.device, next(iter(layer0.values())).weight.dtype
    n_adapters = min(8, pool.num_slots)
    timer = None
    if graphs and device.type == "cuda" and graph_safe(op):
        from kernels.timing import Timer

        timer = Timer(device)

    def timed(fn, eager: bool = False) -> float:
        if timer is None or eager:
            return median_time(fn, device, reps)
        return timer.graph_time_us(fn, reps=reps, flush=False) * 1e-6

    def lora_time(tokens: int, adapters: int, eager: bool = False, mixture: bool = False) -> float:
        slots = [i % adapters for i in range(tokens)]
        batch = LoRABatch.from_token_slots(slots, [rank] * pool.num_slots, [0.0] * pool.num_slots, device=device,
                                           merged_slot=0 if mixture else None)
        cases = []
        for key, lin in layer0.items():
            x = torch.randn(tokens, lin.in_dim, device=device, dtype=dtype)  # [tokens, in]
            y = torch.zeros(tokens, lin.weight.shape[0], device=device, dtype=dtype)  # [tokens, out_total]
            cases.append((y, x, pool.weights(key)))
        return timed(lambda: [op.add_lora(y, x, w, batch) for y, x, w in cases], eager) * layers

    def base_time(tokens: int) -> float:
        xs = [(torch.randn(tokens, lin.in_dim, device=device, dtype=dtype), lin) for lin in layer0.values()]
        return timed(lambda: [F.linear(x, lin.weight) for x, lin in xs]) * layers

    one, many, long = lora_time(8, 1), lora_time(8, n_adapters), lora_time(512, 1)
    per_segment = max(many - one, 0.0) / (max(n_adapters - 1, 1) * rank)
    per_token = max(long - one, 0.0) / (504 * rank)
    launch = max(one - rank * per_segment - 8 * rank * per_token, 0.0)
    others = sum(1 for i in range(8) if i % n_adapters)  # rows that carry two terms (the merged adapter's: none)
    segments = n_adapters - 1  # every other adapter's segment, at rank R + R
    mixed = lora_time(8, n_adapters, mixture=True) if n_adapters > 1 else 0.0
    mixture = max(mixed - launch - 2 * rank * (segments * per_segment + others * per_token), 0.0) if mixed else 0.0
    eager = lora_time(8, 1, eager=True) if timer is not None and not prefill_graphs else one
    decode = base_time(8)
    prefill = max(base_time(512) - decode, 0.0) / 504
    cost = CostModel(switch_s=switch_s, lora_launch_s=launch, lora_segment_rank_s=per_segment,
                     lora_token_rank_s=per_token, decode_step_s=decode, prefill_token_s=prefill, eager_lora_s=eager,
                     mixture_launch_s=mixture)
    logger.info("cost model (%s): switch %.2f ms, LoRA launch %.3f ms (+%.3f ms two-term) + %.2f us/segment-rank + "
                "%.4f us/token-rank, eager LoRA %.2f ms, decode step prior %.2f ms", "graphs" if timer else "eager",
                switch_s * 1e3, launch * 1e3, mixture * 1e3, per_segment * 1e6, per_token * 1e6, eager * 1e3,
                decode * 1e3)
    return cost
