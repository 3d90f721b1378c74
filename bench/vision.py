"""Vision-tower benchmark: transformers' Qwen2.5-VL encoder forward against ours (sync-free eager, and CUDA graphs).

Sets of pictures (each a (t, h, w) patch grid, random pixels) are encoded by the same weights three ways:

    transformers     the module's own forward (one attention call per window, window bounds read back per block)
    ours, eager      VisionTower.encode without graphs (host-built indices, one attention call per block)
    ours, graph      VisionTower.encode replaying its CUDA graph for the grids (GPU only)

Ours include the pixels' copy to the device; transformers' timing starts from pixels already there. Each row also
gives the relative error of ours against transformers in the same dtype, and the floor: the larger of the
encoder's matmul FLOPs at the measured bf16 matmul rate and its weight bytes at the measured copy bandwidth.

    python bench/vision.py --json out.json          # GPU: the 7B's vision tower (dummy weights), bf16
    python bench/vision.py --tiny                   # CPU smoke run: a tiny tower, fp32
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import ceilings  # noqa: E402
from bench.serving import TINY  # noqa: E402
from engine.device import median_time, resolve_device  # noqa: E402
from engine.model.spec import load_spec, parse_config  # noqa: E402
from engine.model.vision import Picture, VisionTower, host_layout  # noqa: E402

CASES = {  # name -> grids; 224 px pictures are (1, 16, 16)
    "1 x 224px": [(1, 16, 16)],
    "4 x 224px": [(1, 16, 16)] * 4,
    "8 x 224px": [(1, 16, 16)] * 8,
    "3 mixed sizes": [(1, 16, 16), (1, 46, 30), (1, 22, 40)],
    "video, 4 frames 448px": [(4, 32, 32)],
}
TINY_CASES = {"1 picture": [(1, 8, 8)], "3 mixed sizes": [(1, 8, 8), (1, 12, 8), (1, 16, 12)]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:qwen2.5-vl-7b", help="checkpoint dir or dummy:<preset|config.json>")
    p.add_argument("--tiny", action="store_true", help="a tiny random tower (CPU smoke runs)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", type=Path, help="write the rows here")
    return p.parse_args()


def encoder_work(tower: VisionTower, grids: list[tuple[int, int, int]]) -> tuple[float, float]:
    """(matmul FLOPs, weight bytes) of one encode: every linear over its rows, and the attention of every run."""
    cfg = tower.module.config
    patches = sum(t * h * w for t, h, w in grids)
    merged = patches // (tower.merge * tower.merge)
    flops = 0.0
    for name, module in tower.module.named_modules():
        if isinstance(module, torch.nn.Linear):
            rows = merged if name.startswith("merger") else patches
            flops += 2.0 * rows * module.in_features * module.out_features
    layout = host_layout(tuple(grids), tower.merge, tower.window)
    per_block = {True: sum(n * n for n in layout.frame_lengths), False: sum(n * n for n in layout.window_lengths)}
    flops += sum(4.0 * cfg.hidden_size * per_block[i in tower.full_blocks] for i in range(cfg.depth))
    weights = sum(p.numel() * p.element_size() for p in tower.module.parameters())
    return flops, weights


@torch.inference_mode()
def bench_case(graphed: VisionTower, eager: VisionTower, grids, reps: int, bandwidth: float,
               matmul: float) -> dict:
    device, dtype = eager.device, eager.dtype
    patch_dim = graphed.module.patch_embed.proj.weight[0].numel()
    pictures = [Picture(torch.randn(t * h * w, patch_dim), (t, h, w), t * h * w // graphed.merge ** 2)
                for t, h, w in grids]
    pixels = torch.cat([p.pixel_values for p in pictures]).to(device, dtype)
    grid_thw = torch.tensor(grids, device=device)
    theirs_out = eager.module(pixels, grid_thw=grid_thw)
    theirs_out = (theirs_out.pooler_output if hasattr(theirs_out, "pooler_output") else theirs_out).float()
    row = {"grids": grids, "patches": sum(t * h * w for t, h, w in grids),
           "transformers_ms": 1e3 * median_time(lambda: eager.module(pixels, grid_thw=grid_thw), device, reps),
           "eager_ms": 1e3 * median_time(lambda: eager.encode(pictures), device, reps)}
    ours = torch.cat(eager.encode(pictures)).float()
    row["eager_rel_err"] = ((ours - theirs_out).norm() / theirs_out.norm()).item()
    if graphed.use_graphs:
        row["graph_ms"] = 1e3 * median_time(lambda: graphed.encode(pictures), device, reps)
        ours = torch.cat(graphed.encode(pictures)).float()
        row["graph_rel_err"] = ((ours - theirs_out).norm() / theirs_out.norm()).item()
    flops, weights = encoder_work(eager, grids)
    row["floor_ms"] = 1e3 * max(flops / matmul, weights / bandwidth)
    best = min(row.get("graph_ms", math.inf), row["eager_ms"])
    row["speedup"] = row["transformers_ms"] / best
    row["of_floor"] = best / row["floor_ms"]
    return row


def main() -> None:
    args = parse_args()
    device = resolve_device("auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = parse_config(dict(TINY)) if args.tiny else load_spec(args.model)
    graphed = VisionTower(spec, None, device, dtype)
    eager = VisionTower(spec, None, device, dtype, cuda_graphs=False)
    eager.module.load_state_dict(graphed.module.state_dict())  # one set of random weights for both
    bandwidth, matmul = ceilings(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: copy {bandwidth / 1e12:.2f} "
          f"TB/s, matmul {matmul / 1e12:.0f} TFLOP/s; tower of {args.model if not args.tiny else 'tiny'} ({dtype})")
    rows = []
    head = "| case | patches | transformers ms | ours eager ms | ours graph ms | speed-up | floor ms | ours / floor |"
    print(head + "\n|" + "---|" * 8)
    for name, grids in (TINY_CASES if args.tiny else CASES).items():
        row = {"case": name, **bench_case(graphed, eager, grids, args.reps, bandwidth, matmul)}
        rows.append(row)
        graph = f"{row['graph_ms']:.2f}" if "graph_ms" in row else "-"
        print(f"| {name} | {row['patches']} | {row['transformers_ms']:.2f} | {row['eager_ms']:.2f} | {graph} | "
              f"{row['speedup']:.1f}x | {row['floor_ms']:.3f} | {row['of_floor']:.1f}x |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": str(dtype), "copy_bytes_per_s": bandwidth,
                                         "matmul_flops_per_s": matmul, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
