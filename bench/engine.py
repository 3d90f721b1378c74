"""Engine benchmark: batch-1 decode against the weight-bandwidth floor, and output tokens/s of the base model vs
32 mixed-rank LoRA adapters, for our `valora` engine and transformers + peft in the same run.

    python bench/engine.py --quick --json out.json            # H200, dummy Qwen2.5-VL-7B, bf16
    python bench/engine.py --model dummy:/path/config.json    # any Qwen2.5-VL-shaped config (CPU smoke runs)
    python bench/engine.py --prefill-ab                       # prefill iterations: eager vs piecewise graphs
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import statistics
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.base import create_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.device import median_time, resolve_device, synchronize  # noqa: E402
from engine.model.checkpoint import Checkpoint  # noqa: E402
from engine.model.spec import ModelSpec  # noqa: E402
from engine.prompt import PromptBuilder  # noqa: E402
from engine.request import EngineRequest, SamplingParams  # noqa: E402
from kernels import fused_linear  # noqa: E402
from kernels.backend import TritonBackend  # noqa: E402

logger = logging.getLogger("bench.engine")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (8, 16, 32, 64)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dummy:qwen2.5-vl-7b")
    p.add_argument("--quick", action="store_true", help="32 new tokens instead of 128; no baseline at batch 128")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--adapters", type=int, default=32, help="adapters for our multi-LoRA runs (ranks 8-64)")
    p.add_argument("--baseline-adapters", type=int, default=8, help="adapters loaded into peft")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, help="override the new tokens per request")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--policy", default="slora",
                   help="our engine's orchestration policy; slora (always unmerged) times the multi-LoRA operator "
                        "itself, the merging policies are compared by bench/serving.py")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/valora-bench"))
    p.add_argument("--overlap-ab", action="store_true",
                   help="only compare decode ms/token with overlapped decode off and on (no adapters, batches 1/8/32)")
    p.add_argument("--row-linear-ab", action="store_true",
                   help="only compare decode ms/token at batches 1, 8 and 16 with the projections on cuBLAS and on "
                        "the Triton linear (EngineConfig.row_linear off and on; no adapters)")
    p.add_argument("--prefill-ab", action="store_true",
                   help="only compare prefill iterations run eagerly and as piecewise CUDA graphs, in one engine "
                        "(batches 1/4/8 of --prompt-tokens, with and without adapters)")
    p.add_argument("--fused-lora-rows", type=int,
                   help="rows of a plain multi-LoRA batch up to which the Triton backend fuses each projection with "
                        "its LoRA update (kernels/fused_linear.py; default the backend's, 8, capped at 1 while the "
                        "side stream is on; 0 = never)")
    p.add_argument("--side-stream-rows", type=int,
                   help="EngineConfig.lora_side_stream_rows for our runs: projections of up to this many rows that "
                        "do not fuse run their LoRA update on a side stream (0 = never; default the config's)")
    p.add_argument("--no-linear-pdl", action="store_true",
                   help="launch each fused projection's shrink and linear one after the other, not chained by "
                        "programmatic dependent launch (kernels/fused_linear.py LINEAR_PDL off)")
    p.add_argument("--no-atmm-pdl", action="store_true",
                   help="launch ATMM's shrink and expand one after the other, not chained by programmatic dependent "
                        "launch (the Triton backend's pdl, on by default on sm_90+)")
    return p.parse_args()


def ceilings(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting reads and writes, bf16 matmul FLOP/s), measured here."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    copy_s = median_time(lambda: dst.copy_(src), device, warmup=3)
    mm_s = median_time(lambda: a @ b, device, warmup=3)
    return 2 * src.numel() * 2 / copy_s, 2 * size ** 3 / mm_s


def write_adapters(root: Path, spec: ModelSpec, count: int, device: torch.device) -> list[tuple[str, int]]:
    """Random PEFT adapters (ranks cycling 8/16/32/64) on every language-model linear; returns (name, rank)."""
    from safetensors.torch import save_file

    dims = {"q_proj": (spec.hidden_size, spec.q_size), "k_proj": (spec.hidden_size, spec.kv_size),
            "v_proj": (spec.hidden_size, spec.kv_size), "o_proj": (spec.q_size, spec.hidden_size),
            "gate_proj": (spec.hidden_size, spec.intermediate_size),
            "up_proj": (spec.hidden_size, spec.intermediate_size),
            "down_proj": (spec.intermediate_size, spec.hidden_size)}
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(count):
        name, rank = f"bench{i:02d}", RANKS[i % len(RANKS)]
        folder = root / name
        out.append((name, rank))
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(spec.num_layers):
            for proj, (d_in, d_out) in dims.items():
                part = "self_attn" if proj[0] in "qkvo" else "mlp"
                key = f"base_model.model.model.language_model.layers.{layer}.{part}.{proj}"
                a = torch.randn(rank, d_in, generator=gen, device=device) * 0.01
                b = torch.randn(d_out, rank, generator=gen, device=device) * 0.01
                tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
                tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        regex = r".*language_model.*\.(" + "|".join(PROJECTIONS) + r")$"
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": regex, "use_rslora": False,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "base_model_name_or_path": None, "task_type": None}))
    return out


def prompt_texts(tokenizer, count: int, tokens: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """Distinct ASCII prompts whose chat-templated ids are exactly ``tokens`` long (when the tokenizer allows)."""
    builder = PromptBuilder(tokenizer, 2)
    rng = random.Random(seed)
    texts, ids = [], []
    for _ in range(count):
        text = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(tokens))
        while len(builder.build(text, [])) > tokens and len(text) > 1:
            text = text[:-1]
        texts.append(text)
        ids.append(builder.build(text, []))
    return texts, ids


def bench_ours(args, adapters: list[tuple[str, int]], texts: list[str], new_tokens: int) -> dict[str, float]:
    engine = create_engine(EngineConfig(
        model=args.model, adapters=str(args.workdir / "adapters"), lora_slots=max(len(adapters), 1),
        max_lora_rank=max(RANKS), max_num_seqs=max(args.batches), max_num_batched_tokens=8192,
        max_model_len=args.prompt_tokens + new_tokens + 64, seed=0, policy=args.policy,
        **({} if args.side_stream_rows is None else {"lora_side_stream_rows": args.side_stream_rows})))
    names = [n for n, _ in adapters]

    def run(batch: int, lora: bool, tokens: int) -> tuple[float, list]:
        reqs = [EngineRequest(prompt=texts[i % len(texts)], adapter=names[i % len(names)] if lora else None,
                              sampling=SamplingParams(max_tokens=tokens)) for i in range(batch)]
        synchronize(engine.device)
        start = time.perf_counter()
        results = engine.generate(reqs)
        synchronize(engine.device)
        bad = [r.error for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"engine errors: {bad[:3]}")
        return time.perf_counter() - start, results

    out: dict[str, float] = {}
    run(1, False, 8)
    per_token = [r.timings.decode_ms / max(1, r.output_tokens - 1) for _ in range(3) for r in run(1, False, 128)[1]]
    out["decode_ms_b1"] = statistics.median(per_token)
    run(1, True, 8)  # loads the adapter
    per_token = [r.timings.decode_ms / max(1, r.output_tokens - 1) for _ in range(3) for r in run(1, True, 128)[1]]
    out["decode_ms_b1_lora"] = statistics.median(per_token)
    for batch in args.batches:
        for lora in (False, True):
            # Warm-up, twice: the first loads the adapters (requests wait for theirs, so prefill runs in pieces);
            # the second sees the timed run's batch shapes, so its kernels are compiled and graphs captured.
            for _ in range(2):
                run(batch, lora, 4)
            wall, results = run(batch, lora, new_tokens)
            out[f"tps_{'lora' if lora else 'base'}_b{batch}"] = sum(r.output_tokens for r in results) / wall
    out["health"] = {k: v for k, v in engine.health().items() if k in (
        "lora_backend", "attention", "cuda_graphs", "adapter_loads", "preemptions", "kv_blocks_total")}
    engine.close()
    return out


def bench_decode_ab(args, texts: list[str], option: str, batches=(1, 8, 32),
                    new_tokens: int = 64) -> dict[str, float]:
    """Decode ms/token (median over requests of 3 runs) with the boolean EngineConfig field ``option`` off, then on,
    in one process (no adapters, policy slora). Each engine's KV cache holds exactly its largest batch, so the second
    engine does not depend on how much of the first one's memory has been returned."""
    out: dict[str, float] = {}
    max_len = args.prompt_tokens + new_tokens + 64
    blocks = max(batches) * -(-max_len // EngineConfig().kv_block_size) + 1
    for on in (False, True):
        engine = create_engine(EngineConfig(model=args.model, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                            max_model_len=max_len, seed=0, policy="slora",
                                            kv_cache_blocks=blocks, **{option: on}))
        for batch in batches:
            def reqs(tokens: int, batch: int = batch) -> list[EngineRequest]:
                return [EngineRequest(prompt=texts[i], sampling=SamplingParams(max_tokens=tokens))
                        for i in range(batch)]

            for _ in range(2):  # compiles, captures the bucket's graph
                engine.generate(reqs(8))
            per = [r.timings.decode_ms / (r.output_tokens - 1)
                   for _ in range(3) for r in engine.generate(reqs(new_tokens))]
            key = f"decode_ms_b{batch}_{option}_{'on' if on else 'off'}"
            out[key] = statistics.median(per)
            print(f"{option}={on} batch {batch}: {out[key]:.3f} ms/token", flush=True)
        engine.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def bench_prefill(args, adapters: list[tuple[str, int]], texts: list[str], batches=(1, 4, 8),
                  reps: int = 5) -> dict[str, float]:
    """One prefill iteration (one step of requests that each want one token), median ms over ``reps``, run as
    piecewise CUDA graphs and then eagerly in the same engine (GPU; on CPU the eager column only)."""
    engine = create_engine(EngineConfig(
        model=args.model, adapters=str(args.workdir / "adapters"), lora_slots=max(len(adapters), 1),
        max_lora_rank=max(RANKS), max_num_seqs=max(batches), max_num_batched_tokens=8192,
        max_model_len=args.prompt_tokens + 64, seed=0, policy="slora",
        pinned_adapters=[n for n, _ in adapters[:max(batches)]]))
    names = [n for n, _ in adapters]
    graphs = engine.runner.prefill_graphs

    def prefill(batch: int, lora: bool) -> float:
        for i in range(batch):
            engine.add_request(EngineRequest(prompt=texts[i % len(texts)], adapter=names[i] if lora else None,
                                             sampling=SamplingParams(max_tokens=1)))
        synchronize(engine.device)
        start = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        elapsed = time.perf_counter() - start
        while engine.has_unfinished():
            engine.step()
        return elapsed

    out: dict[str, float] = {}
    for label, runner_graphs in (("graphs", graphs), ("eager", None)):
        if label == "graphs" and graphs is None:
            continue
        engine.runner.prefill_graphs = runner_graphs
        for batch in batches:
            for lora in (False, True):
                prefill(batch, lora)  # first sight of the shape: kernels, graph pieces
                key = f"prefill_ms_b{batch}_{'lora' if lora else 'base'}_{label}"
                out[key] = 1e3 * statistics.median(prefill(batch, lora) for _ in range(reps))
                print(f"{key}: {out[key]:.2f}", flush=True)
    engine.close()
    return out


def prefill_table(result: dict[str, float], spec: ModelSpec, adapters, prompt_tokens: int, bandwidth: float,
                  flops: float, batches=(1, 4, 8)) -> list[dict]:
    """Rows of ``bench_prefill``: eager (baseline) vs graphs, and the iteration's floor (weights read once, 2
    FLOPs per weight and row; the adapters' bytes and FLOPs added for the LoRA rows)."""
    linear, per_rank = linear_params(spec)
    rows = []
    for batch in batches:
        for lora in (False, True):
            ranks = [r for _, r in adapters[:batch]] if lora else []
            weights = linear + per_rank * sum(ranks)
            tokens = batch * prompt_tokens
            floor = max(2 * weights / bandwidth, 2 * weights * tokens / flops) * 1e3
            kind = "lora" if lora else "base"
            eager, graph = result.get(f"prefill_ms_b{batch}_{kind}_eager"), result.get(
                f"prefill_ms_b{batch}_{kind}_graphs")
            rows.append({"metric": f"prefill ms, {batch} x {prompt_tokens} tokens, {kind}", "baseline": eager,
                         "ours": graph, "speedup_vs_baseline": eager / graph if graph else None, "floor": floor,
                         "of_floor": floor / graph if graph else None})
    return rows


def bench_baseline(args, spec: ModelSpec, adapters: list[tuple[str, int]], ids: list[list[int]],
                   new_tokens: int) -> dict[str, float]:
    """transformers + peft: generate() one batch at a time; mixed adapters through ``adapter_names``."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    device = resolve_device("auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text = {k: spec.raw[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings")
            if k in spec.raw} or {k: v for k, v in spec.raw["text_config"].items()}
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": list(spec.mrope_section),
                               "rope_theta": spec.rope_theta}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=spec.raw["vision_config"],
                              tie_word_embeddings=spec.tie_word_embeddings, image_token_id=spec.image_token_id)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()

    def gen(model, batch: int, tokens: int, names=None) -> float:
        input_ids = torch.tensor([ids[i % len(ids)] for i in range(batch)], device=device)
        extra = {"adapter_names": [names[i % len(names)] for i in range(batch)]} if names else {}
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=0, **extra)
        synchronize(device)
        return time.perf_counter() - start

    out: dict[str, float] = {}
    gen(model, 1, 4)
    steps = max(new_tokens, 8)
    out["decode_ms_b1"] = (gen(model, 1, steps) - gen(model, 1, 1)) / (steps - 1) * 1000.0
    batches = [b for b in args.batches if not (args.quick and b > 32)]
    for batch in batches:
        out[f"tps_base_b{batch}"] = batch * new_tokens / gen(model, batch, new_tokens)
    names = [n for n, _ in adapters[:args.baseline_adapters]]
    root = args.workdir / "adapters"
    model = PeftModel.from_pretrained(model, str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(root / name), adapter_name=name)
    model.eval()
    for batch in batches:
        gen(model, batch, 2, names)
        out[f"tps_lora_b{batch}"] = batch * new_tokens / gen(model, batch, new_tokens, names)
    del model
    gc.collect()
    return out


def linear_params(spec: ModelSpec) -> tuple[int, int]:
    """(weights of the language model's linears and LM head, adapter weights per unit of rank on all of them)."""
    linear = spec.num_layers * (spec.hidden_size * (spec.q_size + 2 * spec.kv_size) + spec.q_size * spec.hidden_size
                                + 3 * spec.hidden_size * spec.intermediate_size) + spec.hidden_size * spec.vocab_size
    # Per unit of rank: A rows (in dims of q/k/v/gate/up, o, down) plus B columns (their out dims).
    per_rank = spec.num_layers * (7 * spec.hidden_size + 2 * spec.q_size + 2 * spec.kv_size
                                  + 3 * spec.intermediate_size)
    return linear, per_rank


def floors(spec: ModelSpec, adapters, batches, bandwidth: float, flops: float, prompt_tokens: int,
           new_tokens: int) -> dict[str, float]:
    """Physical bounds of what is measured: each step reads every weight once and does 2 FLOPs per weight per token.

    A throughput run is one prefill of B x prompt tokens (yielding the first token) plus new_tokens - 1 decode
    steps; its floor is B x new_tokens over the sum of those steps' floors (KV-cache traffic left out).
    """
    linear, per_rank = linear_params(spec)

    def step(weights: float, token_flops: float) -> float:
        return max(2 * weights / bandwidth, token_flops / flops)

    out = {"weight_bytes": 2.0 * linear, "decode_ms_b1": step(linear, 2 * linear) * 1000}
    if adapters:  # batch 1 with the first adapter: its A and B read once per step too
        extra = per_rank * adapters[0][1]
        out["decode_ms_b1_lora"] = step(linear + extra, 2 * linear + 2 * extra) * 1000
    for b in batches:
        ranks = [adapters[i % len(adapters)][1] for i in range(b)] if adapters else [0] * b
        lora_bytes = per_rank * sum(r for _, r in adapters[:b])  # each adapter in use read once per step
        for kind, extra_w, extra_f in (("base", 0, 0), ("lora", lora_bytes, 2 * per_rank * sum(ranks))):
            prefill = step(linear + extra_w, (2 * linear * b + extra_f) * prompt_tokens)
            decode = step(linear + extra_w, 2 * linear * b + extra_f)
            out[f"tps_{kind}_b{b}"] = b * new_tokens / (prefill + (new_tokens - 1) * decode)
    return out


def table(ours: dict, base: dict, floor: dict, batches, ours_adapters: int, peft_adapters: int) -> list[dict]:
    rows = [{"metric": "decode ms/token, batch 1 (lower is better)", "baseline": base.get("decode_ms_b1"),
             "ours": ours["decode_ms_b1"], "floor": floor["decode_ms_b1"]}]
    if "decode_ms_b1_lora" in ours:
        rows.append({"metric": "decode ms/token, batch 1, one adapter (lower is better)", "baseline": None,
                     "ours": ours["decode_ms_b1_lora"], "floor": floor["decode_ms_b1_lora"]})
    for b in batches:
        for kind in ("base", "lora"):
            key = f"tps_{kind}_b{b}"
            label = "base" if kind == "base" else f"multi-LoRA ({ours_adapters} adapters; peft {peft_adapters})"
            rows.append({"metric": f"output tokens/s, batch {b}, {label}", "baseline": base.get(key),
                         "ours": ours[key], "floor": floor[key]})
    for row in rows:
        lower_better = row["metric"].startswith("decode")
        b, o = row["baseline"], row["ours"]
        row["speedup_vs_baseline"] = None if b is None else (b / o if lower_better else o / b)
        row["of_floor"] = row["floor"] / o if lower_better else o / row["floor"]
    for b in batches:
        rows.append({"metric": f"ours multi-LoRA / base throughput, batch {b}",
                     "ours": ours[f"tps_lora_b{b}"] / ours[f"tps_base_b{b}"]})
    return rows


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) and not math.isnan(v) else str(v)


def print_table(rows: list[dict]) -> None:
    head = ("metric", "baseline", "ours", "speedup_vs_baseline", "floor", "of_floor")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k)) for k in head) + " |")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.fused_lora_rows is not None:
        TritonBackend.fused_lora_rows = args.fused_lora_rows
    if args.no_linear_pdl:
        fused_linear.LINEAR_PDL = False
    if args.no_atmm_pdl:
        TritonBackend.pdl = False
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    device = resolve_device("auto")
    checkpoint = Checkpoint(args.model)
    spec = checkpoint.spec
    bandwidth, flops = ceilings(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: copy {bandwidth / 1e12:.2f} "
          f"TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; model {args.model}; {new_tokens} new tokens", flush=True)
    texts, ids = prompt_texts(checkpoint.tokenizer, max(*args.batches, 32), args.prompt_tokens, seed=1)
    if args.overlap_ab or args.row_linear_ab:
        option, batches = ("overlap_decode", (1, 8, 32)) if args.overlap_ab else ("row_linear", (1, 8, 16))
        result = bench_decode_ab(args, texts, option, batches)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, f"{option}_ab": result}, indent=1))
        return
    adapters = write_adapters(args.workdir / "adapters", spec, args.adapters, device)
    if args.prefill_ab:
        rows = prefill_table(bench_prefill(args, adapters, texts), spec, adapters, args.prompt_tokens, bandwidth,
                             flops)
        print_table(rows)
        if args.json:
            args.json.write_text(json.dumps({"model": args.model, "prompt_tokens": args.prompt_tokens,
                                             "copy_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
                                             "rows": rows}, indent=1))
        return
    ours = bench_ours(args, adapters, texts, new_tokens)
    print("ours:", json.dumps(ours), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base: dict[str, float] = {}
    if not args.skip_baseline:
        try:
            base = bench_baseline(args, spec, adapters, ids, new_tokens)
        except Exception:  # the harness's edge: keep our numbers even if the baseline cannot run here
            logger.exception("transformers + peft baseline failed")
    print("baseline:", json.dumps(base), flush=True)
    floor = floors(spec, adapters, args.batches, bandwidth, flops, args.prompt_tokens, new_tokens)
    rows = table(ours, base, floor, args.batches, args.adapters, args.baseline_adapters)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "new_tokens": new_tokens,
                                         "prompt_tokens": args.prompt_tokens, "copy_bytes_per_s": bandwidth,
                                         "matmul_flops_per_s": flops, "engine": ours.get("health"),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
