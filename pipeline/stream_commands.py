"""`valora streams add|list|rm|update`: the operator's stream registry on the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    streams = subparsers.add_parser("streams", help="Register, change, list and remove camera streams.")
    sub = streams.add_subparsers(dest="streams_command", metavar="ACTION", required=True)

    add = sub.add_parser("add", help="Register a stream (validated: URL scheme, media dir, tasks, fps).")
    add.add_argument("id", help="Stream id: lower-case letters, digits, '-' and '_'.")
    add.add_argument("url", help="rtsp(s)://, http(s)://, /dev/videoN, or a file under the media directory.")
    _spec_flags(add)
    add.set_defaults(handler=_add)

    update = sub.add_parser("update", help="Change fields of a registered stream.")
    update.add_argument("id", help="Stream id.")
    update.add_argument("--url", help="New source URL.")
    _spec_flags(update)
    update.set_defaults(handler=_update)

    listing = sub.add_parser("list", help="List streams with their health and last error.")
    listing.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    listing.set_defaults(handler=_list)

    rm = sub.add_parser("rm", help="Remove a stream (its frames and results streams expire on their own).")
    rm.add_argument("id", help="Stream id.")
    rm.set_defaults(handler=_rm)


def _spec_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fps", type=float, help="Frames per second published (0.1-60).")
    parser.add_argument("--task", action="append", metavar="NAME[@FPS]",
                        help="Enable a task, optionally at its own fps (repeatable; replaces the task list).")
    parser.add_argument("--param", action="append", metavar="TASK.KEY=VALUE",
                        help="A task parameter; VALUE is JSON when it parses as JSON (repeatable).")
    parser.add_argument("--accuracy-target", type=float, help="Accuracy target, 0-100.")
    parser.add_argument("--latency-slo-ms", type=float, help="Frame-to-result latency target in ms.")
    parser.add_argument("--max-frame-age-s", type=float, help="Workers skip frames older than this (latest-wins).")
    parser.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None, help="Loop a file source.")
    parser.add_argument("--enabled", action=argparse.BooleanOptionalAction, default=None, help="Ingest this stream.")
    parser.add_argument("--json", dest="spec_json", metavar="SPEC", help="Fields as a JSON object (flags win).")


def spec_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields given on the command line."""
    fields: dict[str, Any] = {}
    if args.spec_json:
        try:
            fields = json.loads(args.spec_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json is not valid JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise ValueError("--json must be a JSON object")
    for name in ("url", "fps", "accuracy_target", "latency_slo_ms", "max_frame_age_s", "loop", "enabled"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.task:
        tasks: dict[str, dict[str, Any]] = {}
        for item in args.task:
            name, _, fps = item.partition("@")
            try:
                tasks[name] = {"fps": float(fps)} if fps else {}
            except ValueError:
                raise ValueError(f"--task {item!r}: fps after '@' must be a number") from None
        fields["tasks"] = tasks
    for item in args.param or []:
        target, sep, raw = item.partition("=")
        task, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--param {item!r} must look like TASK.KEY=VALUE")
        tasks = fields.setdefault("tasks", {})
        if task not in tasks:
            raise ValueError(f"--param {item!r}: task {task!r} is not enabled (add --task {task})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        tasks[task].setdefault("params", {})[key] = value
    return fields


def _registry(args: argparse.Namespace):
    from pipeline.commands import connect, settings_from
    from pipeline.registry import StreamRegistry

    settings = settings_from(args)
    return StreamRegistry(connect(settings), settings.ingest.media_dir)


def _add(args: argparse.Namespace) -> int:
    spec = _registry(args).add(spec_fields(args) | {"id": args.id, "url": args.url})
    print(f"added {spec.id}: {spec.url} ({spec.kind}, {spec.fps:g} fps, tasks: {', '.join(spec.tasks) or 'none'})")
    return 0


def _update(args: argparse.Namespace) -> int:
    spec = _registry(args).update(args.id, spec_fields(args))
    print(f"updated {spec.id}: {spec.url} ({spec.kind}, {spec.fps:g} fps, tasks: {', '.join(spec.tasks) or 'none'})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    try:
        _registry(args).remove(args.id)
    except KeyError:
        raise ValueError(f"no stream {args.id!r} is registered") from None
    print(f"removed {args.id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows = []
    for record in registry.records():
        health = registry.health(record.spec.id)
        rows.append({"spec": record.spec.model_dump(mode="json"), "error": record.error,
                     "health": health.model_dump(mode="json") if health else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'id':<16} {'kind':<7} {'fps':>5} {'state':<12} {'out/s':>6} {'reconn':>6}  tasks / url / error"
    print(header)
    for row in rows:
        spec, health = row["spec"], row["health"] or {}
        print(f"{spec['id']:<16} {spec['kind']:<7} {spec['fps']:>5g} {health.get('state', '-'):<12} "
              f"{health.get('fps_out', 0):>6.1f} {health.get('reconnects', 0):>6}  "
              f"{','.join(spec['tasks']) or '-'}  {spec['url']}" + (f"  ERROR: {row['error']}" if row["error"] else ""))
    return 0
