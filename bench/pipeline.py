"""Pipeline load: N synthetic streams x 5 tasks on CPU through Redis, an engine replica and the task workers.

Reports ingest fps, frame-to-result latency p50/p95/p99 per task, dropped (stale) frames, and the resident memory
of the pipeline process, the engine replica and Redis over time (it must not grow).

    PYTHONPATH=. python bench/pipeline.py --streams 16 --duration 300 --json bench/pipeline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from pipeline.config import IngestConfig, WorkerConfig  # noqa: E402
from pipeline.engine_client import ServiceClient  # noqa: E402
from pipeline.engine_service import wait_for_engines  # noqa: E402
from pipeline.ingest import IngestManager  # noqa: E402
from pipeline.metrics import percentile, summarise  # noqa: E402
from pipeline.redis_server import RedisServer  # noqa: E402
from pipeline.registry import StreamRegistry  # noqa: E402
from pipeline.transport import Transport  # noqa: E402
from pipeline.worker import WorkerPool  # noqa: E402

logger = logging.getLogger("bench.pipeline")
TASKS = ["detection", "captioning", "vqa", "counting", "grounding"]


def tiny_model(work: Path) -> tuple[str, str]:
    """A random tiny Qwen2.5-VL checkpoint with one adapter per task (what the tests use)."""
    from apps.model import tiny

    corpus = ["a red car and a blue bus on the road", "how many cars are there? 3", "car 12 40 50 80"] * 30
    tokenizer = tiny.train_tokenizer(corpus, vocab_size=320)
    model = tiny.build_model("test", tokenizer, seed=0)
    tiny.save_checkpoint(work / "base", model, tokenizer, tiny.image_processor("test"))
    for i, task in enumerate(TASKS):
        tiny.save_random_adapter(model, work / "adapters" / task, 8, 16, seed=i + 1)
    return str(work / "base"), str(work / "adapters")


def start_engine(cfg: EngineConfig, redis_url: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONPATH=str(ROOT), VALORA_ENGINE__BACKEND=cfg.backend,
               VALORA_ENGINE__MODEL=cfg.model, VALORA_ENGINE__ADAPTERS=cfg.adapters, VALORA_ENGINE__DEVICE=cfg.device,
               VALORA_ENGINE__ENGINE_ID="bench-engine")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "engine", "serve"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def run(args: argparse.Namespace) -> dict:
    from apps.datasets.synth import write_clip

    work = Path(tempfile.mkdtemp(prefix="valora-bench-"))
    model, adapters = (args.model, args.adapters) if args.model else tiny_model(work / "tiny")
    engine_cfg = EngineConfig(backend=args.backend, model=model, adapters=adapters, device="cpu")
    media = work / "media"
    clips = [write_clip(media / f"s{i}", args.clip_seconds, seed=100 + i, fps=10.0)[0] for i in range(args.streams)]

    redis = RedisServer(work / "redis", persist=False).start()
    transport = Transport.connect(redis.url)
    engine = start_engine(engine_cfg, redis.url, work / "engine.log")
    stop = threading.Event()
    try:
        wait_for_engines(transport, 1, timeout_s=120)
        registry = StreamRegistry(transport, media)
        params = {"max_tokens": args.max_tokens}
        for i, clip in enumerate(clips):
            registry.add({"id": f"cam{i:02d}", "url": str(clip), "fps": args.stream_fps, "loop": True,
                          "max_frame_age_s": args.max_frame_age,
                          "tasks": {t: {"fps": args.task_fps, "params": params} for t in TASKS}})
        client = ServiceClient(transport)
        pool = WorkerPool(TASKS, transport, registry, client,
                          WorkerConfig(batch_size=args.batch, request_timeout_s=120), worker_id="bench").start()
        for worker in pool.workers:
            worker.prepare()
        ingest = IngestManager(transport, registry, IngestConfig(media_dir=media, stream_maxlen=args.maxlen))
        ingest_thread = threading.Thread(target=ingest.run, args=(stop,), daemon=True)
        started = time.time()
        ingest_thread.start()

        samples = []
        me = os.getpid()
        while time.time() - started < args.duration:
            time.sleep(args.sample_every)
            published = sum(h.frames_published for s in registry.specs() if (h := transport.health_get(s.id)))
            samples.append({"t_s": round(time.time() - started, 1), "published": published,
                            "results": sum(transport.results_length(s.id) for s in registry.specs()),
                            "rss_pipeline_mb": round(rss_mb(me), 1), "rss_engine_mb": round(rss_mb(engine.pid), 1),
                            "rss_redis_mb": round(rss_mb(redis.proc.pid), 1)})
            logger.info("t=%.0fs %s", samples[-1]["t_s"], samples[-1])
        elapsed = time.time() - started
        stop.set()
        ingest_thread.join(30)
        pool.stop()
        client.close()

        results, dropped = [], {}
        for spec in registry.specs():
            results += transport.all_results(spec.id)
            for key, n in transport.dropped(spec.id).items():
                dropped[key] = dropped.get(key, 0) + n
        summary = summarise(results, dropped)
        e2e = [r.latency.frame_to_result_ms for r in results]
        published = samples[-1]["published"] if samples else 0
        half = [s for s in samples if s["t_s"] >= elapsed / 2]
        return {
            "command": " ".join(sys.argv), "machine": f"{platform.node()} {platform.processor() or platform.machine()} "
            f"{psutil.cpu_count()} CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "streams": args.streams,
            "duration_s": round(elapsed, 1), "stream_fps": args.stream_fps, "task_fps": args.task_fps,
            "max_tokens": args.max_tokens, "backend": args.backend, "batch": args.batch, "maxlen": args.maxlen,
            "max_frame_age_s": args.max_frame_age,
            "frames_published": published, "ingest_fps": round(published / elapsed, 2),
            "results": len(results), "results_per_s": round(len(results) / elapsed, 2),
            "errors": sum(not r.ok for r in results),
            "e2e_ms": {"p50": percentile(e2e, 50), "p95": percentile(e2e, 95), "p99": percentile(e2e, 99)},
            "dropped": dropped, "dropped_total": sum(dropped.values()),
            "tasks": {t: s.model_dump(include={"results", "requests", "errors", "p50_ms", "p95_ms", "p99_ms",
                                                "dropped"}) for t, s in summary.tasks.items()},
            "rss_growth_second_half_mb": {
                k: round(half[-1][k] - half[0][k], 1) if len(half) >= 2 else None
                for k in ("rss_pipeline_mb", "rss_engine_mb", "rss_redis_mb")},
            "samples": samples,
        }
    finally:
        stop.set()
        engine.terminate()
        try:
            engine.wait(20)
        except subprocess.TimeoutExpired:
            engine.kill()
        transport.close()
        redis.stop()


def table(r: dict) -> str:
    e2e = r["e2e_ms"]
    lines = [
        f"pipeline load: {r['streams']} streams x 5 tasks, {r['duration_s']:.0f} s, {r['backend']} engine on CPU "
        f"(stream {r['stream_fps']:g} fps, each task {r['task_fps']:g} fps, max_tokens {r['max_tokens']})",
        f"ingest: {r['frames_published']} frames, {r['ingest_fps']:.1f} fps total; results {r['results']} "
        f"({r['results_per_s']:.2f}/s), errors {r['errors']}, dropped stale frames {r['dropped_total']}",
        f"frame-to-result ms: p50 {e2e['p50']:.0f}  p95 {e2e['p95']:.0f}  p99 {e2e['p99']:.0f}",
        f"{'task':<12} {'results':>8} {'requests':>8} {'dropped':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}",
    ]
    for task, s in r["tasks"].items():
        lines.append(f"{task:<12} {s['results']:>8} {s['requests']:>8} {s['dropped']:>8} {s['p50_ms'] or 0:>8.0f} "
                     f"{s['p95_ms'] or 0:>8.0f} {s['p99_ms'] or 0:>8.0f}")
    lines.append(f"{'t (s)':>6} {'published':>10} {'results':>8} {'RSS pipeline':>13} {'engine':>8} {'redis':>7}  (MB)")
    for s in r["samples"]:
        lines.append(f"{s['t_s']:>6.0f} {s['published']:>10} {s['results']:>8} {s['rss_pipeline_mb']:>13.0f} "
                     f"{s['rss_engine_mb']:>8.0f} {s['rss_redis_mb']:>7.0f}")
    growth = r["rss_growth_second_half_mb"]
    lines.append(f"RSS change over the second half: pipeline {growth['rss_pipeline_mb']} MB, engine "
                 f"{growth['rss_engine_mb']} MB, redis {growth['rss_redis_mb']} MB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--duration", type=float, default=300.0, help="Seconds of load after startup.")
    parser.add_argument("--stream-fps", type=float, default=2.0, help="Frames per second each stream publishes.")
    parser.add_argument("--task-fps", type=float, default=0.2, help="Frames per second each task samples.")
    parser.add_argument("--max-tokens", type=int, default=8, help="Decode cap per request (random weights never stop).")
    parser.add_argument("--max-frame-age", type=float, default=10.0, help="Workers skip older frames (latest-wins).")
    parser.add_argument("--clip-seconds", type=float, default=20.0, help="Length of each looping synthetic clip.")
    parser.add_argument("--batch", type=int, default=2, help="Frames a task worker keeps in flight.")
    parser.add_argument("--maxlen", type=int, default=200, help="Approximate cap of each frames stream.")
    parser.add_argument("--sample-every", type=float, default=30.0, help="Seconds between RSS samples.")
    parser.add_argument("--backend", default="hf", help="Engine backend.")
    parser.add_argument("--model", help="Checkpoint dir (default: a random tiny one).")
    parser.add_argument("--adapters", help="Adapter dir with one adapter per task name.")
    parser.add_argument("--json", help="Write the full result here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("pipeline", "transformers", "apps"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
