"""Decoder building blocks: RMSNorm, SwiGLU activation, and the fused linear that adapter updates hook into."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora.delta import LayerDelta, LayerKey
from engine.model.rope import apply_rope

logger = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [tokens, hidden] -> normalised in fp32 and scaled, in x's dtype (transformers' Qwen2RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(norm(x + residual), x + residual): the pre-norm of the next sub-layer and its residual stream."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [tokens, 2 * inter] (gate then up) -> silu(gate) * up: [tokens, inter]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


ROW_LINEAR_ROWS = 16  # kernels.fused_linear.MAX_ROWS (not imported here: the engine imports Triton only on use)
_ROW_DTYPES = (torch.bfloat16, torch.float16)


class FusedOps:
    """The element-wise ops of a layer, optionally torch.compile'd on GPU (fused kernels, fewer launches), and the
    base matmul of the adapted linears (``linear``, or ``linear_beside`` with the adapter update on a side stream)."""

    def __init__(self, compiled: bool, row_linear: bool = False, side_stream_rows: int = 0) -> None:
        self.compiled, self.row_linear, self.side_stream_rows = compiled, row_linear, side_stream_rows
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.rms_norm, self.add_rms_norm, self.silu_and_mul = rms_norm, add_rms_norm, silu_and_mul
        self.apply_rope = apply_rope
        if compiled:
            self.rms_norm = torch.compile(rms_norm, dynamic=True)
            self.add_rms_norm = torch.compile(add_rms_norm, dynamic=True)
            self.silu_and_mul = torch.compile(silu_and_mul, dynamic=True)
            self.apply_rope = torch.compile(apply_rope, dynamic=True)


    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x: [tokens, in] -> x Wᵀ + b; with ``row_linear``, bf16/fp16 CUDA inputs of up to ``ROW_LINEAR_ROWS`` rows (a
        decode batch) take the Triton linear of kernels/fused_linear.py."""
        if self.row_linear and 0 < x.shape[0] <= ROW_LINEAR_ROWS and x.is_cuda and x.dtype in _ROW_DTYPES:
            from kernels.fused_linear import routed_linear

            return routed_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def beside(self, x: torch.Tensor) -> bool:
        """Whether ``linear_beside`` runs the update of this x on a side stream: CUDA inputs of up to
        ``side_stream_rows`` rows."""
        return x.is_cuda and 0 < x.shape[0] <= self.side_stream_rows

    def linear_beside(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      update: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """x Wᵀ + b + the update that ``update(z)`` adds into a zeroed z of the output's shape and dtype.

        On CUDA the update runs on a side stream while the base matmul streams its weight (a decode batch's base
        matmul and adapter pair each leave bandwidth idle), and the output takes z in one more add: the update is
        rounded to the output dtype once more than when it adds into the output directly. Elsewhere the same in
        order. The fork and join are stream waits, so CUDA graphs capture them."""
        z = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        if not x.is_cuda:
            update(z.zero_())
            return self.linear(x, weight, bias).add_(z)
        main = torch.cuda.current_stream(x.device)
        side = self._side_streams.get(x.device)
        if side is None:
            side = self._side_streams[x.device] = torch.cuda.Stream(x.device)
        side.wait_stream(main)  # x and z are ready (z was allocated on main, which outlives the join below)
        with torch.cuda.stream(side):
            update(z.zero_())
        y = self.linear(x, weight, bias)
        main.wait_stream(side)
        return y.add_(z)

    @torch.inference_mode()
    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run each compiled op once; if compilation fails on this machine, fall back to the eager ops."""
        if not self.compiled:
            return
        try:
            x = torch.randn(3, 64, device=device, dtype=dtype)  # [tokens, hidden]
            w = torch.ones(64, device=device, dtype=dtype)
            self.rms_norm(x, w, 1e-6)
            self.add_rms_norm(x, x, w, 1e-6)
            self.silu_and_mul(x)
            q = x.view(3, 2, 32)
            self.apply_rope(q, q, x[:, :32], x[:, :32])
        except (RuntimeError, ImportError, OSError) as exc:  # inductor's failures are RuntimeError subclasses
            logger.warning("torch.compile of the element-wise ops failed (%s); running them eagerly", exc)
            self.__init__(compiled=False, row_linear=self.row_linear, side_stream_rows=self.side_stream_rows)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, ops: FusedOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class AdaptedLinear(nn.Module):
    """One linear, or several fused along the output dim (q/k/v, gate/up), that adapter deltas add onto.

    ``slice_bounds`` are the output column offsets of the fused parts; LoRA pools use the same slicing.
    """

    def __init__(self, in_dim: int, out_dims: Sequence[int], bias: bool, key: LayerKey,
                 ops: FusedOps | None = None) -> None:
        super().__init__()
        self.ops = ops or FusedOps(compiled=False)
        self.in_dim = in_dim
        self.out_dims = tuple(out_dims)
        self.slice_bounds = tuple(int(b) for b in torch.tensor([0, *out_dims]).cumsum(0).tolist())
        self.key = key
        self.weight = nn.Parameter(torch.empty(self.slice_bounds[-1], in_dim))  # [out_total, in]
        self.bias = nn.Parameter(torch.zeros(self.slice_bounds[-1])) if bias else None

    def forward(self, x: torch.Tensor, deltas: Sequence[LayerDelta] = ()) -> torch.Tensor:
        """x: [tokens, in] -> [tokens, out_total]: x Wᵀ + b, plus each delta's update."""
        if len(deltas) == 1:  # a lone delta may fuse its update into the matmul (kernels/fused_linear.py)
            y = deltas[0].linear(self.key, x, self.weight, self.bias)
            if y is not None:
                return y
        if deltas and self.ops.beside(x):
            return self.ops.linear_beside(x, self.weight, self.bias, lambda z: self._add_updates(deltas, x, z))
        y = self.ops.linear(x, self.weight, self.bias)
        self._add_updates(deltas, x, y)
        return y

    def _add_updates(self, deltas: Sequence[LayerDelta], x: torch.Tensor, y: torch.Tensor) -> None:
        for delta in deltas:
            delta.apply(self.key, x, y)
