"""Compile, for an NVIDIA H200 (sm_90), every ATMM kernel variant a 7B server precompiles with the shipped H200 tile
table and the fused decode linear's variants for the 7B's groups, with Triton's bundled ptxas and no GPU; print one
JSON line per variant (kernel, shared memory, error).

Run by test_sm90_compile.py in a subprocess: kernels must be built without TRITON_INTERPRET to be compiled.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.kernels import ROUTED_GROUPS  # noqa: E402  (the 7B's projection groups)
from kernels import atmm, fused_linear  # noqa: E402
from kernels.lora_batch import LoRAWeights  # noqa: E402
from kernels.precompile import plan_routed_variants, plan_variants  # noqa: E402
from kernels.tile_config import ShapeKey, device_table  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tmp_ptr": "*fp32",
                 "scale_ptr": "*fp32", "route_gate_ptr": "*fp32", "w_ptr": "*bf16", "bias_ptr": "*bf16"}


def pool(in_dim: int, widths: tuple[int, ...], slots: int, rank: int = 64) -> LoRAWeights:
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    return LoRAWeights(torch.empty(slots, len(widths), rank, in_dim, dtype=torch.bfloat16, device="meta"),
                       torch.empty(slots, bounds[-1], rank, dtype=torch.bfloat16, device="meta"), tuple(bounds))


def compile_variant(kernel, meta: dict) -> int:
    """Compile ``kernel`` with compile-time arguments ``meta`` for sm_90; returns its shared memory in bytes.

    The arguments are specialised as a 7B's launch specialises them: pointers 16-byte aligned, and every integer
    the kernel does not exempt (sizes and strides of the 7B's projections) a multiple of 16. That is what lets the
    compiler vectorise loads and software-pipeline them through shared memory, so the shared memory checked here is
    what the GPU allocates."""
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    meta.pop("launch_pdl", None)
    params = inspect.signature(kernel.fn).parameters
    signature = {name: "constexpr" if name in meta else POINTER_TYPES.get(name, "*i32") if name.endswith("_ptr")
                 else "i32" for name in params}
    exempt = set(kernel.do_not_specialize)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(params)
             if name not in meta and (name.endswith("_ptr") or name not in exempt)}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta, attrs=attrs), target=TARGET,
                              options=options)
    return int(compiled.metadata.shared)


def main() -> int:
    table = device_table("nvidia_h200")
    metas: dict[tuple, tuple] = {}
    for in_dim, widths in ROUTED_GROUPS.values():
        for (shrink, expand) in [*plan_variants(pool(in_dim, widths, 33), max_tokens=1024, max_segments=32,
                                                table=table),
                                 *plan_routed_variants(pool(in_dim, widths, 16), max_tokens=1024, experts=16, top_k=2,
                                                       max_rank=64, table=table)]:
            metas[("shrink", shrink)] = (atmm._shrink_kernel, dict(shrink))
            metas[("expand", expand)] = (atmm._expand_kernel, dict(expand))
    for in_dim, widths in ROUTED_GROUPS.values():  # the fused decode linear: GEMV, routed at 1 and 16 rows
        out_dim, bias = sum(widths), len(widths) == 3
        for rows in (1, 16):
            key = ShapeKey(segments=8, tokens=rows * 2, in_dim=in_dim, out_dim=out_dim, max_rank=64)
            splits = table.lookup_routed(key)[0].shrink.split_k
            routed = fused_linear.linear_config(rows, out_dim, in_dim, lora=True)
            for pdl in (False, True):  # chained to the shrink by programmatic dependent launch, or not
                meta = fused_linear.linear_meta(rows, in_dim, routed, bias, False, len(widths), splits, 2, 8, 64, 64,
                                                pdl=pdl)
                metas[("linear", tuple(sorted(meta.items())))] = (fused_linear._linear_kernel, meta)
        plain = fused_linear.linear_config(1, out_dim, in_dim)
        meta = fused_linear.linear_meta(1, in_dim, plain, bias, False)
        metas[("linear", tuple(sorted(meta.items())))] = (fused_linear._linear_kernel, meta)
    for (name, key), (kernel, meta) in list(metas.items())[:2]:  # programmatic dependent launch lowers too
        metas[(name + "+pdl", key)] = (kernel, {**meta, "USE_PDL": True})
    for (name, _), (kernel, meta) in metas.items():
        row = {"kernel": name, "meta": {k: v for k, v in meta.items() if k.isupper()}}
        try:
            row["shared"] = compile_variant(kernel, meta)
        except Exception as exc:  # reported, not raised: the test lists every failing variant
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
