"""Engine-private torch stand-in for kernels.backend's add_lora, used only while that module is not importable.

It is eager-only (it reads segment bounds on the host), so LoRA iterations run without CUDA graphs while
it is in use. The kernels branch's "torch" / "triton" backends replace it at merge time.
"""

from __future__ import annotations

import torch

from kernels.lora_batch import LoRABatch, LoRAWeights


class TorchAddLoRA:
    """add_lora by a loop over segments, each adapter at its true rank."""

    name = "engine-torch-fallback"
    cuda_graph_safe = False

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None:
        """Semantics: y[t, slice i] += scale[s] · (x[t] @ A[slot, i, :r].T) @ B[slot, slice i, :r].T for t in segment s.

        y: [T, out_total] (updated in place); x: [T, in_dim]; weights.a: [slots, n_slices, max_rank, in_dim];
        weights.b: [slots, out_total, max_rank].
        """
        if batch.num_segments == 0:
            return
        indptr = batch.seg_indptr.tolist()
        slots, ranks, scales = batch.seg_slots.tolist(), batch.seg_ranks.tolist(), batch.seg_scales.tolist()
        bounds = weights.slice_bounds
        for s in range(batch.num_segments):
            lo, hi, rank = indptr[s], indptr[s + 1], ranks[s]
            if hi == lo or rank == 0:
                continue
            rows = batch.token_indices[lo:hi].long()
            xs = x.index_select(0, rows)  # [n, in_dim]
            a = weights.a[slots[s], :, :rank]  # [n_slices, r, in_dim]
            b = weights.b[slots[s], :, :rank]  # [out_total, r]
            xa = xs @ a.reshape(-1, a.shape[-1]).t()  # [n, n_slices * r]
            out = torch.empty(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)  # [n, out_total]
            for i in range(weights.n_slices):
                out[:, bounds[i]:bounds[i + 1]] = xa[:, i * rank:(i + 1) * rank] @ b[bounds[i]:bounds[i + 1]].t()
            y.index_put_((rows,), out * scales[s], accumulate=True)  # (CPU index_add_ is ~1000x slower)
