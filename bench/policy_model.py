"""Mode policies in virtual time, with the H200's measured costs: an estimate, not a measurement.

    python bench/policy_model.py                      # rates 20 / 26 / 32 req/s, skews 0.9-0.1, 20 s traces
    python bench/policy_model.py --rates 26 --json out.json
    python bench/policy_model.py --regime graphs --rates 24 32 --ceiling   # the fifth session's engine

The engine loop is modelled by tests/engine/policy_sim.py (the policies' real decision code, the scheduler's
batching rules, the cost model following measured iterations). The clock charges what the H200 runs measured
(bench/RESULTS.md): a decode step of 4.5 ms plus the graph-timed multi-LoRA op (0.9 ms + 2 µs per segment and
unit of rank, and 0.6 ms more for a two-term (mixture) launch: mixture decode steps measured 6.6-7.5 ms against
6.2-6.5 ms unmerged in the fourth session's run J); an eager (prefill) iteration's fixed cost (45 ms) plus 50 µs a
row, plus the eager multi-LoRA overhead (24 ms) when it has any LoRA row, fitted to run J's mean prefill
iterations (54-75 ms without LoRA rows, 73-98 ms with, at 200-300 rows); a weight switch of 7.8 ms. The traces
are bench/traces.py's (the serving bench's task mix; each picture adds 64 tokens).

``--regime graphs`` charges the fifth session's engine instead (prefill iterations and picture encodes as CUDA
graphs; run L in bench/RESULTS.md): merged decode steps of 3-4 rows took 4.9 ms and unmerged ones of 4-5 rows
6.4-7.0 ms (a launch cost of 1.3 ms and 2.35 µs per segment and unit of rank, the start-up calibration's), mixture
steps 1.2 ms more, prefill iterations of ~175 rows 14 ms merged and 17-19 ms with LoRA rows (2 ms + 50 µs a row on
top of the decode step, and 3 ms of LoRA). The policies then see what the engine's start-up calibration measured
(launch 0.9 ms, no two-term extra, which mixture steps correct online).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.traces import TraceConfig, adapter_names, generate  # noqa: E402
from engine.orchestrator.cost import CostModel  # noqa: E402
from tests.engine.policy_sim import SimRequest, Simulator  # noqa: E402

POLICIES = ("valora", "slora", "dlora", "merged-only")


@dataclass
class MeasuredCosts(CostModel):
    """The clock: the engine's cost model plus the fixed host cost of an eager iteration (which the engine's
    model folds into its per-token prefill cost)."""

    eager_step_s: float = 0.045

    def step_s(self, decode_rows: int, prefill_tokens: int) -> float:
        return super().step_s(decode_rows, prefill_tokens) + (self.eager_step_s if prefill_tokens else 0.0)


# regime -> (what the policies' cost model starts from, what the clock charges beyond it)
REGIMES: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "eager": (dict(switch_s=0.0078, lora_launch_s=0.0009, lora_segment_rank_s=2e-6, lora_token_rank_s=1e-11,
                   decode_step_s=0.0045, prefill_token_s=50e-6, eager_lora_s=0.024, mixture_launch_s=0.0006), {}),
    "graphs": (dict(switch_s=0.0079, lora_launch_s=0.0009, lora_segment_rank_s=2.35e-6, lora_token_rank_s=7.3e-8,
                    decode_step_s=0.0038, prefill_token_s=50e-6, eager_lora_s=0.0011, mixture_launch_s=0.0),
               dict(lora_launch_s=0.0013, decode_step_s=0.0048, eager_lora_s=0.003, mixture_launch_s=0.0012,
                    eager_step_s=0.002)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[20.0, 26.0, 32.0], help="requests per second")
    p.add_argument("--skews", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1])
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--regime", choices=sorted(REGIMES), default="eager",
                   help="whose costs: the fourth session's eager prefill, or the fifth's prefill graphs")
    p.add_argument("--ceiling", action="store_true",
                   help="also serve each trace with `slora` on a clock where the multi-LoRA op costs nothing: what "
                        "no merging policy can beat (every row as if merged, switches free)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ranks = {name: (8, 16, 32, 64)[i % 4] for i, name in enumerate(adapter_names(32))}
    policy_view, truth = REGIMES[args.regime]
    clock = MeasuredCosts(**{**policy_view, **truth})
    free = MeasuredCosts(**{**policy_view, **truth, **dict(lora_launch_s=0.0, lora_segment_rank_s=0.0,
                                                          lora_token_rank_s=0.0, eager_lora_s=0.0,
                                                          mixture_launch_s=0.0)})
    rows = []
    extra = " | no-LoRA-cost avg ms | its cut vs slora" if args.ceiling else ""
    print("| rate req/s | skew | " + " | ".join(f"{n} avg / p95 ms" for n in POLICIES)
          + " | valora vs slora | vs dlora" + extra + " |")
    print("|---|---|" + "---|" * (len(POLICIES) + 2 + 2 * args.ceiling))
    for rate in args.rates:
        for skew in args.skews:
            reqs = generate(TraceConfig(rate=rate, duration_s=args.duration, num_adapters=32, skew=skew, seed=0))
            trace = [SimRequest(r.arrival, r.adapter, r.prompt_tokens + 64 * r.frames, r.output_tokens,
                                r.arrival + r.slo_s) for r in reqs]
            avg, p95 = {}, {}
            for name in POLICIES:
                sim = Simulator(name, CostModel(**policy_view), ranks, max_num_seqs=64, max_tokens=4096, truth=clock)
                latency = [o.finished - o.request.arrival for o in sim.run(trace)]
                avg[name] = 1e3 * statistics.mean(latency)
                p95[name] = 1e3 * statistics.quantiles(latency, n=20)[-1]
            cut = {b: 1 - avg["valora"] / avg[b] for b in ("slora", "dlora")}
            tail = ""
            if args.ceiling:
                sim = Simulator("slora", CostModel(**policy_view), ranks, max_num_seqs=64, max_tokens=4096, truth=free)
                avg["no-lora-cost"] = 1e3 * statistics.mean(o.finished - o.request.arrival for o in sim.run(trace))
                tail = f" | {avg['no-lora-cost']:.0f} | {1 - avg['no-lora-cost'] / avg['slora']:+.1%}"
            rows.append({"rate": rate, "skew": skew, "avg_ms": avg, "p95_ms": p95})
            print(f"| {rate:.0f} | {skew:.1f} | " + " | ".join(f"{avg[n]:.0f} / {p95[n]:.0f}" for n in POLICIES)
                  + f" | {cut['slora']:+.1%} | {cut['dlora']:+.1%}{tail} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"regime": args.regime, "costs": policy_view, "clock": truth,
                                         "eager_step_s": clock.eager_step_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
