"""The one module that talks to Redis: every key and stream family is named and typed here, and nowhere else."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.exceptions

from engine.request import EngineRequest, EngineResult
from pipeline.schema import EngineHealth, EngineTick, FrameEntry, MetricsSummary, StreamHealth, TaskResult

logger = logging.getLogger(__name__)

# Errors that mean "Redis is not reachable right now"; long-running loops back off and retry on these.
REDIS_DOWN: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
RedisError = redis.exceptions.RedisError


class Keys:
    """Names of every key and stream family."""

    REGISTRY = "valora:streams"  # hash: stream id -> StreamSpec JSON
    REGISTRY_STATUS = "valora:streams:status"  # hash: stream id -> {"error", "at"} JSON
    ENGINE_REQUESTS = "valora:engine:requests"  # stream: EngineRequest JSON
    ENGINE_GROUP = "engine"
    DEAD_LETTER = "valora:deadletter"  # stream: entries delivered too often
    METRICS_SUMMARY = "valora:metrics:summary"  # string: MetricsSummary JSON
    ENGINE_TIMELINE = "valora:engine:timeline"  # stream: EngineTick JSON, capped

    @staticmethod
    def frames(stream: str) -> str:
        return f"valora:frames:{stream}"

    @staticmethod
    def frame_blob(stream: str, seq: int) -> str:
        return f"valora:frame:{stream}:{seq}"

    @staticmethod
    def results(stream: str) -> str:
        return f"valora:results:{stream}"

    @staticmethod
    def health(stream: str) -> str:
        return f"valora:health:{stream}"

    @staticmethod
    def dropped(stream: str) -> str:
        """Hash: '<task>:<reason>' -> frames a worker skipped."""
        return f"valora:dropped:{stream}"

    @staticmethod
    def task_group(task: str) -> str:
        return f"task:{task}"

    @staticmethod
    def done(stream: str, task: str, entry_id: str) -> str:
        return f"valora:done:{stream}:{task}:{entry_id}"

    @staticmethod
    def replies(client_id: str) -> str:
        return f"valora:engine:replies:{client_id}"

    @staticmethod
    def request_image(image_id: str, request_id: str) -> str:
        return f"valora:engine:image:{request_id}:{image_id}"

    @staticmethod
    def answered(request_id: str) -> str:
        return f"valora:engine:answered:{request_id}"

    @staticmethod
    def engine_health(engine_id: str) -> str:
        return f"valora:engine:health:{engine_id}"


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a consumer."""

    key: str
    entry_id: str
    fields: dict[bytes, bytes] | None  # None when the entry was trimmed before it could be claimed
    deliveries: int = 1


@dataclass(frozen=True)
class GroupInfo:
    """A consumer group's backlog on one stream (from XINFO)."""

    key: str
    group: str
    pending: int
    lag_ms: float  # age of the newest entry minus age of the last delivered one


# Store a task result and acknowledge its frame in one step, at most once per (stream, task, entry).
_STORE_RESULT = """
local stored = 0
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[4])) then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'json', ARGV[5])
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
return stored
"""

# Reply to an engine request, acknowledge and delete it, at most once per request id.
_REPLY = """
local sent = 0
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[3])) then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', '10000', '*', 'json', ARGV[5])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  sent = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return sent
"""

DONE_TTL_S = 3600  # outlives any re-delivery of a frame or request (streams are trimmed long before)


class Transport:
    """Typed access to VaLoRA's Redis: frames, results, registry, health, engine requests and replies."""

    def __init__(self, url: str, connect_timeout_s: float = 3.0) -> None:
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=connect_timeout_s, socket_timeout=30.0, health_check_interval=15,
        )
        self._store_result = self.client.register_script(_STORE_RESULT)
        self._reply = self.client.register_script(_REPLY)

    @classmethod
    def connect(cls, url: str, connect_timeout_s: float = 3.0) -> Transport:
        """A transport whose Redis answered PING; ConnectionError names the URL when it does not."""
        transport = cls(url, connect_timeout_s)
        try:
            transport.client.ping()
        except REDIS_DOWN as exc:
            transport.close()
            raise ConnectionError(f"cannot reach Redis at {url}: {exc}") from None
        return transport

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except REDIS_DOWN:
            return False

    def wait_until_up(self, stop_event, max_delay_s: float = 2.0) -> bool:
        """Block until Redis answers again (True) or ``stop_event`` is set (False)."""
        delay = 0.1
        while not stop_event.is_set():
            if self.ping():
                return True
            stop_event.wait(delay)
            delay = min(max_delay_s, delay * 2)
        return False

    def close(self) -> None:
        self.client.close()

    # -- registry -------------------------------------------------------------------------------------------

    def registry_put(self, stream_id: str, spec_json: str) -> None:
        self.client.hset(Keys.REGISTRY, stream_id, spec_json)

    def registry_get(self, stream_id: str) -> str | None:
        raw = self.client.hget(Keys.REGISTRY, stream_id)
        return raw.decode() if raw is not None else None

    def registry_all(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(Keys.REGISTRY).items()}

    def registry_delete(self, stream_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.hdel(Keys.REGISTRY, stream_id)
            pipe.hdel(Keys.REGISTRY_STATUS, stream_id)
            pipe.delete(Keys.health(stream_id), Keys.dropped(stream_id))
            removed, *_ = pipe.execute()
        return bool(removed)

    def status_set(self, stream_id: str, error: str | None) -> None:
        if error is None:
            self.client.hdel(Keys.REGISTRY_STATUS, stream_id)
        else:
            self.client.hset(Keys.REGISTRY_STATUS, stream_id, json.dumps({"error": error, "at": time.time()}))

    def status_all(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.client.hgetall(Keys.REGISTRY_STATUS).items()}

    # -- stream health --------------------------------------------------------------------------------------

    def health_put(self, health: StreamHealth) -> None:
        """The typed record under 'json', plus the fields an operator greps with redis-cli."""
        self.client.hset(Keys.health(health.stream), mapping={
            "json": health.model_dump_json(), "state": health.state, "last_error": health.last_error or "",
            "reconnects": health.reconnects, "fps_out": health.fps_out, "frames_published": health.frames_published,
        })

    def health_get(self, stream_id: str) -> StreamHealth | None:
        raw = self.client.hget(Keys.health(stream_id), "json")
        return StreamHealth.model_validate_json(raw) if raw is not None else None

    # -- frames ---------------------------------------------------------------------------------------------

    def publish_frame(self, frame: FrameEntry, maxlen: int, ttl_s: int) -> str:
        """XADD a frame (JPEG in its own key with a TTL when ``ttl_s`` > 0); returns the entry id."""
        fields: dict[str, Any] = {}
        with self.client.pipeline(transaction=False) as pipe:
            if ttl_s > 0 and frame.jpeg is not None:
                key = Keys.frame_blob(frame.stream, frame.seq)
                pipe.set(key, frame.jpeg, ex=ttl_s)
                frame = frame.model_copy(update={"jpeg": None, "key": key})
            elif frame.jpeg is not None:
                fields["jpeg"] = frame.jpeg
            fields["meta"] = frame.model_dump_json(exclude={"jpeg"})
            pipe.xadd(Keys.frames(frame.stream), fields, maxlen=maxlen, approximate=True)
            *_, entry_id = pipe.execute()
        return entry_id.decode()

    @staticmethod
    def decode_frame(fields: dict[bytes, bytes]) -> FrameEntry:
        frame = FrameEntry.model_validate_json(fields[b"meta"])
        if b"jpeg" in fields:
            frame.jpeg = fields[b"jpeg"]
        return frame

    def frame_jpeg(self, frame: FrameEntry) -> bytes | None:
        """The frame's JPEG, inline or from its key; None once the key has expired."""
        if frame.jpeg is not None:
            return frame.jpeg
        return self.client.get(frame.key) if frame.key else None

    def blob(self, key: str) -> bytes | None:
        return self.client.get(key)

    def latest_frame(self, stream_id: str) -> FrameEntry | None:
        entries = self.client.xrevrange(Keys.frames(stream_id), count=1)
        return self.decode_frame(entries[0][1]) if entries else None

    def frames_range(self, stream_id: str, start: str, count: int = 32) -> list[tuple[str, FrameEntry]]:
        """Up to ``count`` (entry id, frame) pairs from ``start`` (XRANGE bound: 'ms', 'ms-n', '(id'), oldest first."""
        entries = self.client.xrange(Keys.frames(stream_id), min=start, count=count)
        return [(eid.decode(), self.decode_frame(fields)) for eid, fields in entries]

    def stream_last_id(self, stream_id: str) -> str | None:
        entries = self.client.xrevrange(Keys.frames(stream_id), count=1)
        return entries[0][0].decode() if entries else None

    # -- consumer groups ------------------------------------------------------------------------------------

    def ensure_group(self, key: str, group: str, start: str = "0") -> None:
        """Create ``group`` on stream ``key`` (and the stream) unless it exists."""
        try:
            self.client.xgroup_create(key, group, id=start, mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_group(self, group: str, consumer: str, keys: list[str], count: int, block_ms: int,
                   own_pending: bool = False) -> list[Delivery]:
        """New entries for ``consumer`` (or, with ``own_pending``, the ones it already holds unacknowledged).

        A group that vanished (Redis restarted without its data) is created again and the read returns nothing.
        """
        if not keys:
            return []
        start = "0" if own_pending else ">"
        try:
            reply = self.client.xreadgroup(group, consumer, dict.fromkeys(keys, start), count=count,
                                           block=None if own_pending else block_ms)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            for key in keys:
                self.ensure_group(key, group)
            return []
        out: list[Delivery] = []
        for key, entries in reply or []:
            name = key.decode() if isinstance(key, bytes) else key
            for entry_id, fields in entries:
                if own_pending and not fields:
                    # Trimmed while pending: nothing left to process.
                    self.client.xack(name, group, entry_id)
                    continue
                out.append(Delivery(name, entry_id.decode(), fields))
        return out

    def claim_stale(self, key: str, group: str, consumer: str, min_idle_ms: int, count: int = 32) -> list[Delivery]:
        """XAUTOCLAIM entries idle longer than ``min_idle_ms``; each comes with its delivery count."""
        try:
            reply = self.client.xautoclaim(key, group, consumer, min_idle_ms, start_id="0-0", count=count)
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group(key, group)
            return []
        claimed = reply[1]
        if not claimed:
            return []
        ids = [entry_id for entry_id, _ in claimed]
        counts = {
            p["message_id"]: p["times_delivered"]
            for p in self.client.xpending_range(key, group, min=ids[0], max=ids[-1], count=len(ids) + 64,
                                                consumername=consumer)
        }
        return [Delivery(key, eid.decode(), fields or None, counts.get(eid, 1)) for eid, fields in claimed]

    def ack(self, key: str, group: str, entry_id: str) -> None:
        self.client.xack(key, group, entry_id)

    def dead_letter(self, delivery: Delivery, group: str, reason: str) -> None:
        """Move an entry that keeps failing to the dead-letter stream and acknowledge it."""
        fields = {k.decode(): v for k, v in (delivery.fields or {}).items() if k != b"jpeg"}
        fields.update({"source": delivery.key, "group": group, "entry_id": delivery.entry_id, "reason": reason,
                       "deliveries": delivery.deliveries})
        with self.client.pipeline() as pipe:
            pipe.xadd(Keys.DEAD_LETTER, fields, maxlen=10_000, approximate=True)
            pipe.xack(delivery.key, group, delivery.entry_id)
            pipe.execute()
        logger.warning("dead-lettered %s %s for %s after %d deliveries: %s", delivery.key, delivery.entry_id, group,
                       delivery.deliveries, reason)

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        return [{k.decode(): v.decode(errors="replace") for k, v in fields.items()}
                for _, fields in self.client.xrevrange(Keys.DEAD_LETTER, count=count)]

    def group_info(self, key: str) -> list[GroupInfo]:
        """Backlog of every group on a stream; lag is measured from entry-id timestamps (Redis 6.2 has no LAG)."""
        try:
            groups = self.client.xinfo_groups(key)
            last = self.client.xinfo_stream(key)["last-generated-id"]
        except redis.exceptions.ResponseError:
            return []
        newest_ms = _id_ms(last)
        return [GroupInfo(key, g["name"].decode(), int(g["pending"]),
                          max(0.0, newest_ms - _id_ms(g["last-delivered-id"]))) for g in groups]

    def group_drained(self, key: str, group: str) -> bool:
        """Whether ``group`` has been handed every entry of ``key`` and acknowledged them all."""
        try:
            info = {g["name"].decode(): g for g in self.client.xinfo_groups(key)}
            last = self.client.xinfo_stream(key)["last-generated-id"]
        except redis.exceptions.ResponseError:
            return False
        g = info.get(group)
        return g is not None and int(g["pending"]) == 0 and g["last-delivered-id"] == last

    def count_dropped(self, stream_id: str, task: str, reason: str, n: int = 1) -> None:
        self.client.hincrby(Keys.dropped(stream_id), f"{task}:{reason}", n)

    def dropped(self, stream_id: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(Keys.dropped(stream_id)).items()}

    # -- results --------------------------------------------------------------------------------------------

    def store_result(self, result: TaskResult, delivery: Delivery, group: str, maxlen: int) -> bool:
        """Append the result and XACK its frame atomically; False when this entry's result was already stored."""
        stored = self._store_result(
            keys=[Keys.results(result.stream), delivery.key, Keys.done(result.stream, result.task, delivery.entry_id)],
            args=[group, delivery.entry_id, maxlen, DONE_TTL_S, result.model_dump_json()],
        )
        return bool(stored)

    def results(self, stream_id: str, count: int = 100, after: str | None = None) -> list[tuple[str, TaskResult]]:
        """Newest ``count`` results (newest first), or, with ``after``, the ones after that id (oldest first)."""
        key = Keys.results(stream_id)
        if after is not None:
            entries = self.client.xrange(key, min=f"({after}", count=count)
        else:
            entries = self.client.xrevrange(key, count=count)
        return [(eid.decode(), TaskResult.model_validate_json(fields[b"json"])) for eid, fields in entries]

    def all_results(self, stream_id: str, page: int = 500) -> list[TaskResult]:
        """Every result still retained for a stream, oldest first."""
        out: list[TaskResult] = []
        after = "-"
        while True:
            entries = self.client.xrange(Keys.results(stream_id), min=after, count=page)
            out += [TaskResult.model_validate_json(fields[b"json"]) for _, fields in entries]
            if len(entries) < page:
                return out
            after = "(" + entries[-1][0].decode()

    def delete_stream(self, stream_id: str) -> None:
        """Forget a stream entirely: registry entry, health, counters, frames and results."""
        self.registry_delete(stream_id)
        self.client.delete(Keys.frames(stream_id), Keys.results(stream_id))

    def results_length(self, stream_id: str) -> int:
        return int(self.client.xlen(Keys.results(stream_id)))

    def summary_put(self, summary: MetricsSummary, ttl_s: int = 300) -> None:
        self.client.set(Keys.METRICS_SUMMARY, summary.model_dump_json(), ex=ttl_s)

    def summary_get(self) -> MetricsSummary | None:
        raw = self.client.get(Keys.METRICS_SUMMARY)
        return MetricsSummary.model_validate_json(raw) if raw is not None else None

    # -- engine requests and replies ------------------------------------------------------------------------

    def submit_request(self, request: EngineRequest, maxlen: int, image_ttl_s: int = 600) -> str:
        """Queue a request for the engine service; inline pictures move into keys the service resolves."""
        with self.client.pipeline(transaction=False) as pipe:
            images = []
            for img in request.images:
                if img.jpeg is not None:
                    key = Keys.request_image(img.id, request.request_id)
                    pipe.set(key, img.jpeg, ex=image_ttl_s)
                    img = img.model_copy(update={"jpeg": None, "key": key})
                images.append(img)
            wire = request.model_copy(update={"images": images})
            pipe.xadd(Keys.ENGINE_REQUESTS, {"json": wire.model_dump_json()}, maxlen=maxlen, approximate=True)
            *_, entry_id = pipe.execute()
        return entry_id.decode()

    @staticmethod
    def decode_request(fields: dict[bytes, bytes]) -> EngineRequest:
        return EngineRequest.model_validate_json(fields[b"json"])

    def reply(self, result: EngineResult, reply_to: str, delivery: Delivery, ttl_s: int) -> bool:
        """Send a result to its caller, then XACK and XDEL the request, all at most once per request id."""
        sent = self._reply(
            keys=[reply_to, delivery.key, Keys.answered(result.request_id)],
            args=[Keys.ENGINE_GROUP, delivery.entry_id, DONE_TTL_S, ttl_s, result.model_dump_json()],
        )
        return bool(sent)

    def read_replies(self, client_id: str, last_id: str, block_ms: int, count: int = 64
                     ) -> tuple[str, list[EngineResult]]:
        reply = self.client.xread({Keys.replies(client_id): last_id}, count=count, block=block_ms)
        results: list[EngineResult] = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                results.append(EngineResult.model_validate_json(fields[b"json"]))
        return last_id, results

    def replies_last_id(self, client_id: str) -> str:
        entries = self.client.xrevrange(Keys.replies(client_id), count=1)
        return entries[0][0].decode() if entries else "0-0"

    def delete_replies(self, client_id: str) -> None:
        self.client.delete(Keys.replies(client_id))

    def pending_requests(self) -> list[dict[str, Any]]:
        """Engine requests handed to a replica and not yet answered: id, consumer, idle ms, deliveries."""
        try:
            return [{"entry_id": p["message_id"].decode(), "consumer": p["consumer"].decode(),
                     "idle_ms": p["time_since_delivered"], "deliveries": p["times_delivered"]}
                    for p in self.client.xpending_range(Keys.ENGINE_REQUESTS, Keys.ENGINE_GROUP, "-", "+", 1000)]
        except redis.exceptions.ResponseError:
            return []

    def engine_health_put(self, health: EngineHealth, ttl_s: int) -> None:
        self.client.set(Keys.engine_health(health.engine_id), health.model_dump_json(), ex=ttl_s)

    def engine_tick_add(self, tick: EngineTick, maxlen: int = 3600) -> None:
        self.client.xadd(Keys.ENGINE_TIMELINE, {"json": tick.model_dump_json()}, maxlen=maxlen, approximate=True)

    def engine_ticks(self, count: int = 600) -> list[EngineTick]:
        """The newest ``count`` ticks of every replica, oldest first."""
        entries = self.client.xrevrange(Keys.ENGINE_TIMELINE, count=count)
        return [EngineTick.model_validate_json(fields[b"json"]) for _, fields in reversed(entries)]

    def engine_health_all(self) -> list[EngineHealth]:
        keys = sorted(self.client.scan_iter(match=Keys.engine_health("*"), count=100))
        values = self.client.mget(keys) if keys else []
        return [EngineHealth.model_validate_json(v) for v in values if v is not None]


def _id_ms(entry_id: bytes | str) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return float(text.split("-", 1)[0])
