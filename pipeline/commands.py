"""Sub-commands of the pipeline package: redis, ingest, worker, engine serve, api, demo (streams: stream_commands)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading

from engine.config import EngineConfig
from pipeline.config import IngestConfig, Settings, WorkerConfig, add_config_args, load_settings, overrides_from_args

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TASK_CHOICES = ["all", "detection", "captioning", "vqa", "counting", "grounding"]
ENGINE_FLAGS = ["backend", "model", "adapters", "device", "max_num_seqs", "engine_id"]


def register(subparsers: argparse._SubParsersAction) -> None:
    redis_cmd = subparsers.add_parser("redis", help="Run the embedded Redis in the foreground.")
    redis_cmd.add_argument("--port", type=int, default=6379, help="Port to listen on (127.0.0.1).")
    redis_cmd.set_defaults(handler=_redis)

    ingest = subparsers.add_parser("ingest", help="Decode registered streams and publish frames to Redis.")
    ingest.add_argument("--stream", action="append", help="Only this stream id (repeatable); default all enabled.")
    add_config_args(ingest, "ingest", IngestConfig, ["media_dir", "max_side", "jpeg_quality", "stall_timeout_s"])
    ingest.set_defaults(handler=_ingest)

    worker = subparsers.add_parser("worker", help="Run task workers: frames in, scored results out.")
    worker.add_argument("--task", default="all", choices=TASK_CHOICES, help="The task to run, or all five.")
    worker.add_argument("--engine", default="service", choices=["service", "local"],
                        help="'service': send requests to `valora engine serve`; 'local': run the engine in-process.")
    add_config_args(worker, "worker", WorkerConfig, ["batch_size", "claim_idle_ms", "max_deliveries",
                                                     "request_timeout_s"])
    add_config_args(worker, "engine", EngineConfig, ENGINE_FLAGS)
    worker.set_defaults(handler=_worker)

    engine = subparsers.add_parser("engine", help="The engine service.")
    engine_sub = engine.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    serve = engine_sub.add_parser("serve", help="Serve valora:engine:requests (one replica; run more to share load).")
    add_config_args(serve, "engine", EngineConfig, ENGINE_FLAGS)
    serve.set_defaults(handler=_engine_serve)

    api = subparsers.add_parser("api", help="Serve the token-guarded HTTP API for stream registration.")
    api.add_argument("--host", dest="cfg:api.host", default=argparse.SUPPRESS, help="Address to bind.")
    api.add_argument("--port", dest="cfg:api.port", type=int, default=argparse.SUPPRESS, help="Port to listen on.")
    api.add_argument("--token", dest="cfg:api.token", default=argparse.SUPPRESS,
                     help="Bearer token (prefer VALORA_API__TOKEN: flags show up in process lists).")
    api.set_defaults(handler=_api)

    demo = subparsers.add_parser("demo", help="Run the pipeline over a synthetic clip; print per-task results.")
    demo.add_argument("--video", help="MP4 to run on (its .jsonl sidecar gives ground truth); default: a fresh clip.")
    demo.add_argument("--seconds", type=float, default=8.0, help="Length of the generated clip.")
    demo.add_argument("--fps", type=float, default=2.0, help="Frames per second each task looks at.")
    demo.add_argument("--report", help="Write the per-task table as JSON to this path.")
    demo.add_argument("--timeout", type=float, default=600.0, help="Give up after this many seconds.")
    demo.add_argument("--ui", action="store_true", help="Also open the dashboard on the running demo.")
    add_config_args(demo, "engine", EngineConfig, ENGINE_FLAGS)
    demo.set_defaults(handler=_demo)


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), overrides_from_args(args))


def connect(settings: Settings):
    """The transport to the configured Redis (default 127.0.0.1:6379); ConnectionError names the URL."""
    from pipeline.transport import Transport

    return Transport.connect(settings.redis.url or DEFAULT_REDIS_URL, settings.redis.connect_timeout_s)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _redis(args: argparse.Namespace) -> int:
    from pipeline.redis_server import RedisServer

    settings = load_settings(args.config)
    stop = stop_on_signals()
    with RedisServer(settings.redis.state_dir / "redis", port=args.port) as server:
        print(f"redis listening at {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import IngestManager
    from pipeline.metrics import start_exporter
    from pipeline.registry import StreamRegistry

    settings = settings_from(args)
    transport = connect(settings)
    start_exporter(settings.metrics.prometheus_port)
    registry = StreamRegistry(transport, settings.ingest.media_dir)
    manager = IngestManager(transport, registry, settings.ingest, set(args.stream) if args.stream else None)
    manager.run(stop_on_signals())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from pipeline.engine_client import LocalClient, ServiceClient
    from pipeline.metrics import SummaryPublisher, start_exporter
    from pipeline.registry import StreamRegistry
    from pipeline.worker import WorkerPool, manifest_defaults

    settings = settings_from(args)
    transport = connect(settings)
    start_exporter(settings.metrics.prometheus_port)
    registry = StreamRegistry(transport, settings.ingest.media_dir)
    if args.engine == "local":
        from pipeline.engine_service import build_engine

        client = LocalClient(build_engine(settings.engine))
    else:
        client = ServiceClient(transport, settings.service.requests_maxlen)
    tasks = TASK_CHOICES[1:] if args.task == "all" else [args.task]
    pool = WorkerPool(tasks, transport, registry, client, settings.worker,
                      defaults=manifest_defaults(settings.engine.adapters)).start()
    summary = SummaryPublisher(transport, lambda: [s.id for s in registry.specs()],
                               settings.worker.summary_interval_s).start()
    stop_on_signals().wait()
    summary.stop()
    pool.stop()
    client.close()
    return 0


def _engine_serve(args: argparse.Namespace) -> int:
    from pipeline.engine_service import EngineService, build_engine
    from pipeline.metrics import start_exporter

    settings = settings_from(args)
    transport = connect(settings)
    start_exporter(settings.metrics.prometheus_port)
    stop = stop_on_signals()
    engine = build_engine(settings.engine)
    try:
        EngineService(transport, engine, settings.service).run(stop)
    finally:
        engine.close()
    return 0


def _api(args: argparse.Namespace) -> int:
    from pipeline.api import StreamsApi
    from pipeline.registry import StreamRegistry

    settings = settings_from(args)
    transport = connect(settings)
    registry = StreamRegistry(transport, settings.ingest.media_dir)
    api = StreamsApi(registry, settings.api.token or "", settings.api.host, settings.api.port).start()
    print(f"streams API at {api.url}", flush=True)
    stop_on_signals().wait()
    api.stop()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipeline.demo import Demo, DemoOptions

    options = DemoOptions(video=args.video, seconds=args.seconds, fps=args.fps, report=args.report,
                          timeout_s=args.timeout, ui=args.ui)
    return Demo(settings_from(args), options).run()
