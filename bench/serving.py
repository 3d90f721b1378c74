"""Serving benchmark: every orchestration policy on the same synthetic traces, latency vs adapter skew.

    python bench/serving.py --quick --json out.json --plot bench/serving_h200.png   # H200, dummy Qwen2.5-VL-7B
    python bench/serving.py --tiny --quick --plot /tmp/serving.png                  # CPU smoke run, tiny dummy model
    python bench/serving.py --skews 0.9 0.5 --loads 0.6 --duration 8 --repeats 3 --rehearse  # fewer points, less noise

One engine (32 adapters of ranks 8-64 on every language-model linear, generated in memory and pinned in the
device pool) replays each trace (bench/traces.py: Poisson arrivals, hottest-adapter share = skew, the vision task
mix) once per policy, switching policy between runs. Rates are fractions of the capacity measured first (a
closed burst on the unmerged engine), or of ``--capacity`` when given (the same rates in every session's run).
Latency is end to end from each request's scheduled arrival. Also: the swift switch of a pool-max-rank adapter
across all layers against its memory floor.

Short traces are noisy (on the H200, one policy's average latency varied by ~35% between runs of one 3 s trace),
and a run that meets a new kernel shape compiles it (~0.5 s per Triton variant; the engine now compiles the
multi-LoRA variants at start-up): ``--repeats`` interleaves several timed runs per point, ``--rehearse`` replays
each trace untimed first, and each row records what was compiled and its iteration times by mode.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving_report import plot, table  # noqa: E402
from bench.traces import TraceConfig, TraceRequest, adapter_names, generate, summary  # noqa: E402
from engine.adapter_store import AdapterSpec  # noqa: E402
from engine.base import create_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.device import synchronize  # noqa: E402
from engine.heads import TaskHead  # noqa: E402
from engine.lora.host_adapter import HostAdapter  # noqa: E402
from engine.request import EngineRequest, ImageRef, SamplingParams  # noqa: E402

logger = logging.getLogger("bench.serving")
POLICIES = ("valora", "slora", "dlora", "punica", "merged-only")  # a run cut by --budget-s loses the last first
RANKS = (8, 16, 32, 64)
TINY = {  # a Qwen2.5-VL-shaped config small enough for a CPU run
    "model_type": "qwen2_5_vl", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "vocab_size": 320, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                      "in_channels": 3, "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
                      "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:qwen2.5-vl-7b", help="checkpoint dir or dummy:<preset|config.json>")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen2.5-VL (CPU smoke runs)")
    p.add_argument("--quick", action="store_true", help="skews 0.9/0.5/0.1 at one load, 3 s traces")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), type=policy_arg,
                   help=f"from {', '.join(POLICIES)}; NAME:sync runs NAME with one synchronous step per call")
    p.add_argument("--skews", type=float, nargs="+")
    p.add_argument("--loads", type=float, nargs="+", help="request rates as fractions of the measured capacity")
    p.add_argument("--capacity", type=float,
                   help="requests/s that --loads are fractions of, instead of measuring it (runs of different "
                        "sessions then offer the same rates)")
    p.add_argument("--duration", type=float, help="seconds of arrivals per trace")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--output-scale", type=float, default=1.0, help="scales every task's output lengths")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per policy and point, interleaved across policies (the table shows the mean and "
                        "the range)")
    p.add_argument("--rehearse", action="store_true",
                   help="replay each trace once untimed before timing it (Triton compiles the shapes it meets)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip the remaining timed runs once they have taken this long, start-up not counted "
                        "(0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-overlap", action="store_true", help="read each step's tokens before the next is queued")
    p.add_argument("--json", type=Path, help="write every measurement here")
    p.add_argument("--plot", type=Path, help="write a PNG of latency vs skew per policy here")
    args = p.parse_args()
    # Highest skew first: a run cut short by --budget-s loses the points where policies differ least.
    args.skews = args.skews or ([0.9, 0.5, 0.1] if args.quick else [0.9, 0.7, 0.5, 0.3, 0.1])
    args.loads = args.loads or ([0.75] if args.quick else [0.3, 0.6, 0.85, 1.0])
    args.duration = args.duration or (3.0 if args.quick else 20.0)
    return args


def policy_arg(text: str) -> str:
    name, _, variant = text.partition(":")
    if name not in POLICIES or variant not in ("", "sync"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(POLICIES)}, optionally with ':sync'")
    return text


def use_policy(engine, label: str, overlap: bool) -> None:
    """Serve with policy ``label`` (NAME or NAME:sync) from now on."""
    name, _, variant = label.partition(":")
    engine.set_policy(name)
    engine.overlap = overlap and variant != "sync"


def model_name(args: argparse.Namespace, workdir: Path) -> str:
    if not args.tiny:
        return args.model
    path = workdir / "tiny_config.json"
    path.write_text(json.dumps(TINY))
    return f"dummy:{path}"


def build_engine(args: argparse.Namespace, model: str, workdir: Path):
    """The engine under test; starts on `valora` so the clean weight copies and the cost model exist."""
    cfg = EngineConfig(model=model, adapters=str(workdir / "adapters"), policy="valora", lora_slots=args.adapters,
                       max_lora_rank=max(RANKS), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=4096,
                       max_model_len=2048, seed=args.seed, overlap_decode=not args.no_overlap)
    engine = create_engine(cfg)
    add_adapters(engine, args.adapters, args.seed)
    for name, positions in (("detect", 4), ("count", 1)):
        engine.register_head(name, LinearHead(engine.checkpoint.spec.hidden_size, positions))
    return engine


@torch.inference_mode()
def add_adapters(engine, count: int, seed: int) -> list[tuple[str, int]]:
    """Random adapters (ranks cycling 8/16/32/64, alpha = 2r) on every language-model linear, pinned in the pool."""
    layout, device, dtype = engine.lora.layout, engine.device, engine.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i, name in enumerate(adapter_names(count)):
        rank = RANKS[i % len(RANKS)]
        a, b = {}, {}
        for group, (in_dim, widths) in layout.groups.items():
            a[group] = (torch.randn(layout.num_layers, len(widths), rank, in_dim, generator=gen, device=device)
                        * 0.01).to(dtype)  # [layers, slices, r, in]
            b[group] = (torch.randn(layout.num_layers, sum(widths), rank, generator=gen, device=device)
                        * 0.01).to(dtype)  # [layers, out_total, r]
        spec = AdapterSpec(name=name, path=Path("<memory>"), rank=rank, alpha=2.0 * rank, use_rslora=False,
                           target_modules=(), rank_pattern={}, alpha_pattern={})
        engine.lora.add_adapter(spec, HostAdapter(name, rank, spec.scaling, a, b, None), pin=True)
        synchronize(device)  # the slot copy (a side stream on GPU) reads a and b: keep them until it is done
        out.append((name, rank))
    return out


class LinearHead(TaskHead):
    """A detection / counting head stand-in: one linear layer over the last ``positions`` hidden states."""

    def __init__(self, hidden: int, positions: int) -> None:
        super().__init__()
        self.positions = positions
        self.proj = torch.nn.Linear(hidden, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)  # [positions, 8]

    def decode(self, output: torch.Tensor) -> dict:
        return {"classes": output.argmax(-1).tolist()}


def pictures(size: int, count: int = 8) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def to_request(req: TraceRequest, created_at: float, images: list[bytes], tag: str) -> EngineRequest:
    """An engine request for a trace entry; tasks on one frame (consecutive pairs) share its picture."""
    frame = req.index // 2
    refs = [ImageRef(id=f"{tag}-{frame}-{j}", jpeg=images[(frame + j) % len(images)]) for j in range(req.frames)]
    head = {"detection": "detect", "counting": "count"}.get(req.task)
    return EngineRequest(prompt="x" * req.prompt_tokens, adapter=req.adapter, images=refs, head=head,
                         sampling=SamplingParams(max_tokens=max(req.output_tokens, 1)), created_at=created_at,
                         deadline=created_at + req.slo_s, meta={"task": req.task, "index": req.index})


def replay(engine, trace: list[TraceRequest], images: list[bytes], tag: str, cap_s: float) -> dict:
    """Feed the trace in real time and step the engine; a run still going after ``cap_s`` is cut off, and its
    unfinished requests count with the latency they had reached (so an overloaded policy is not flattered)."""
    start = time.time()
    sent: dict[str, TraceRequest] = {}
    done = []
    i = 0
    while (i < len(trace) or engine.has_unfinished()) and time.time() - start < cap_s:
        now = time.time() - start
        while i < len(trace) and trace[i].arrival <= now:
            req = to_request(trace[i], start + trace[i].arrival, images, tag)
            sent[req.request_id] = trace[i]
            engine.add_request(req)
            i += 1
        if engine.has_unfinished():
            done += engine.step()
        elif i < len(trace):
            time.sleep(max(0.0, min(trace[i].arrival - (time.time() - start), 0.05)))
    synchronize(engine.device)
    wall = time.time() - start
    latency = {r.request_id: r.timings.e2e_ms / 1e3 for r in done}
    lat = [latency.get(rid, wall - t.arrival) for rid, t in sent.items()]
    lat += [wall - t.arrival for t in trace[i:] if t.arrival < wall]
    modes: dict[str, int] = {}
    for r in done:
        for m in r.mode.split("+"):
            modes[m] = modes.get(m, 0) + 1
    return {"requests": len(trace), "finished": len(done), "unfinished": len(trace) - len(done),
            "errors": sum(not r.ok for r in done), "wall_s": wall,
            "avg_ms": 1e3 * statistics.mean(lat) if lat else math.nan,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)) if lat else math.nan,
            "p95_ms": 1e3 * float(np.percentile(lat, 95)) if lat else math.nan,
            "throughput_rps": len(done) / wall, "output_tps": sum(r.output_tokens for r in done) / wall,
            "slo_met": sum(r.ok and latency[r.request_id] <= sent[r.request_id].slo_s for r in done) / len(trace),
            "modes": modes}


def drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def warm_up(engine, args, images: list[bytes]) -> None:
    """A closed burst per policy at skew 0.8 (merges, mixture and plain batches): kernels compile and decode graphs
    are captured before anything is timed."""
    burst = generate(TraceConfig(rate=1e6, duration_s=1.0, num_adapters=args.adapters, skew=0.8,
                                 output_scale=args.output_scale, seed=args.seed + 7))[: args.max_num_seqs // 2]
    for policy in args.policies:
        use_policy(engine, policy, not args.no_overlap)
        for req in burst:
            engine.add_request(to_request(req, time.time(), images, f"warm-{policy}"))
        drain(engine)


def capacity(engine, args, images: list[bytes]) -> float:
    """Requests per second of the unmerged engine on a closed burst of the skew-0.5 mix (full batches)."""
    use_policy(engine, "slora", not args.no_overlap)
    burst = generate(TraceConfig(rate=1e6, duration_s=1.0, num_adapters=args.adapters, skew=0.5,
                                 output_scale=args.output_scale, seed=args.seed + 99))[: 2 * args.max_num_seqs]
    start = time.time()
    for req in burst:
        engine.add_request(to_request(req, time.time(), images, "cap"))
    drain(engine)
    return len(burst) / (time.time() - start)


def compiled() -> dict[str, int]:
    """Kernels compiled so far: Triton variants of the project's kernels, and torch.compile graphs. A timed run
    that compiles stalls for about half a second per Triton variant (so the table says how many there were)."""
    triton_variants = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith(("kernels.", "engine.")):
            continue
        for obj in vars(module).values():
            for cache in getattr(obj, "device_caches", {}).values():
                triton_variants += len(cache[0])
    graphs = 0
    try:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError):
        pass
    return {"triton": triton_variants, "dynamo": graphs}


def cost_snapshot(engine) -> dict | None:
    """The cost model's measured base costs after a run (the policies' view of an iteration), in ms."""
    cost = engine.orchestrator.cost
    if cost is None:
        return None
    return {"iteration_ms": cost.iteration_s * 1e3, "decode_step_ms": cost.decode_step_s * 1e3,
            "prefill_token_us": cost.prefill_token_s * 1e6, "prefill_base_ms": cost.prefill_base_s * 1e3}


def switch_cost(engine) -> dict:
    """One swift-switch launch of a pool-max-rank adapter across all layers, against its memory floor."""
    switcher, pool = engine.switcher, engine.lora.pool
    seconds = switcher.measure(reps=5)
    weights = sum(t.weight.numel() * t.weight.element_size() for t in switcher.plan.targets)
    adapter = sum(t.lora.a[0].numel() + t.lora.b[0].numel() for t in switcher.plan.targets) * pool.a["o"].element_size()
    moved = 2 * weights + adapter  # read base (or W), write W, read the adapter's A and B once
    src = torch.empty(min(weights, 1 << 30) // 2, dtype=torch.bfloat16, device=engine.device)  # <= 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        synchronize(engine.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(engine.device)
        times.append(time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * src.element_size() / min(times)
    return {"switch_ms": seconds * 1e3, "bytes": moved, "copy_bytes_per_s": bandwidth,
            "floor_ms": moved / bandwidth * 1e3, "of_floor": seconds / (moved / bandwidth),
            "rank": switcher.max_rank, "targets": len(switcher.plan.targets), "base_copy": switcher.base_copy}


def timed_run(engine, args, trace: list[TraceRequest], images: list[bytes], policy: str, load: float, cap: float,
              skew: float, rep: int) -> dict:
    """One policy on one trace (the first repeat rehearsed untimed with ``--rehearse``), with what it decided and
    compiled. Image ids are new for every run, so no run finds another's frames in the vision cache."""
    use_policy(engine, policy, not args.no_overlap)
    if args.rehearse and rep == 0:  # untimed: the batch shapes this run meets get their kernels compiled
        replay(engine, trace, images, f"rehearse-{policy}-{load}-{skew}", cap_s=1.5 * args.duration + 3)
        drain(engine)
    switches, decided, before = engine.merge_state.switches, Counter(engine.orchestrator.decisions), compiled()
    ran = {k: Counter(v) for k, v in engine.orchestrator.iterations.items()}
    row = replay(engine, trace, images, f"{policy}-{load}-{skew}-{rep}", cap_s=1.5 * args.duration + 3)
    drain(engine)
    row.update(load=load, rate=load * cap, skew=skew, policy=policy, repeat=rep,
               switches=engine.merge_state.switches - switches, trace=summary(trace),
               cost=cost_snapshot(engine), decisions=dict(engine.orchestrator.decisions - decided),
               compiled={k: v - before[k] for k, v in compiled().items()},
               iterations=iteration_times(engine.orchestrator.iterations, ran))
    print(f"load {load:.2f} skew {skew:.1f} {policy:>11}: avg {row['avg_ms']:8.1f} ms  p95 "
          f"{row['p95_ms']:8.1f} ms  {row['throughput_rps']:6.1f} req/s  switches {row['switches']:4d}  "
          f"modes {row['modes']}  unfinished {row['unfinished']}  decisions {row['decisions']}  "
          f"compiled {row['compiled']}  cost {row['cost']}", flush=True)
    print("    iterations: " + "  ".join(f"{k} {v['n']} x {v['mean_ms']:.1f} ms ({v['rows_per']:.0f} rows)"
                                         for k, v in row["iterations"].items()), flush=True)
    return row


def iteration_times(now: dict[str, Counter], before: dict[str, Counter]) -> dict[str, dict]:
    """Iterations of one run by '<mode> decode|prefill': how many, their mean measured time and rows."""
    out = {}
    for label, tally in sorted(now.items()):
        diff = tally - before.get(label, Counter())
        if diff["n"]:
            out[label] = {"n": diff["n"], "mean_ms": 1e3 * diff["seconds"] / diff["n"],
                          "rows_per": diff["rows"] / diff["n"]}
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="valora-serving-"))
    (workdir / "adapters").mkdir()
    engine = build_engine(args, model_name(args, workdir), workdir)
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    label = "tiny dummy Qwen2.5-VL" if args.tiny else engine.config.model
    images = pictures(args.image_size)
    switch = switch_cost(engine)
    print(f"device {device}; model {label}; {args.adapters} adapters (ranks {RANKS}); "
          f"swift switch {switch['switch_ms']:.2f} ms vs floor {switch['floor_ms']:.2f} ms "
          f"({switch['of_floor']:.2f}x); precompiled {engine.precompiled[0]} multi-LoRA kernel variants in "
          f"{engine.precompiled[1]:.1f} s", flush=True)
    warm_up(engine, args, images)
    cap = args.capacity or capacity(engine, args, images)
    how = "given" if args.capacity else "closed burst, unmerged"
    print(f"capacity ({how}): {cap:.1f} requests/s; start-up {time.time() - started:.0f} s", flush=True)
    runs, skipped = [], []
    timed = time.time()
    for load in args.loads:
        for skew in args.skews:
            trace = generate(TraceConfig(rate=load * cap, duration_s=args.duration, num_adapters=args.adapters,
                                         skew=skew, output_scale=args.output_scale, seed=args.seed))
            for rep in range(args.repeats):
                for i in range(len(args.policies)):  # each repeat starts one policy later: no fixed order effects
                    policy = args.policies[(i + rep) % len(args.policies)]
                    if args.budget_s and time.time() - timed > args.budget_s:
                        skipped.append({"load": load, "skew": skew, "policy": policy, "repeat": rep})
                        continue
                    runs.append(timed_run(engine, args, trace, images, policy, load, cap, skew, rep))
    print(table(runs, args.policies))
    if skipped:
        print(f"skipped past the {args.budget_s:.0f} s budget: {len(skipped)} runs", flush=True)
    result = {"device": device, "model": label, "adapters": args.adapters, "ranks": RANKS,
              "duration_s": args.duration, "capacity_rps": cap, "switch": switch, "runs": runs, "skipped": skipped,
              "precompiled": {"variants": engine.precompiled[0], "seconds": engine.precompiled[1]},
              "cost_model": vars(engine.orchestrator.cost) if engine.orchestrator.cost else None,
              "wall_s": time.time() - started}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        plot(runs, args.policies, args.plot, f"{device}: {label}, {args.adapters} adapters (ranks 8-64)")
    engine.close()


if __name__ == "__main__":
    main()
