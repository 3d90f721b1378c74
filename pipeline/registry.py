"""StreamRegistry: the one way the CLI, the dashboard and the HTTP API register, change and list streams."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.schema import StreamHealth, StreamRecord, StreamSpec
from pipeline.transport import Transport

logger = logging.getLogger(__name__)


class SpecError(ValueError):
    """A stream spec failed validation; the message names each bad field."""


def parse_spec(data: dict[str, Any], media_dir: Path | None) -> StreamSpec:
    """Validate a spec (with the media-directory rule when ``media_dir`` is given); SpecError explains a refusal."""
    try:
        return StreamSpec.model_validate(data, context={"media_dir": media_dir} if media_dir is not None else None)
    except ValidationError as exc:
        raise SpecError(describe_validation(exc)) from None


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid stream spec: " + "; ".join(parts)


class StreamRegistry:
    """Stream specs in the ``valora:streams`` hash, with each stream's last error and health."""

    def __init__(self, transport: Transport, media_dir: Path) -> None:
        self.transport = transport
        self.media_dir = media_dir

    def add(self, data: dict[str, Any], replace: bool = False) -> StreamSpec:
        spec = parse_spec(data, self.media_dir)
        if not replace and self.transport.registry_get(spec.id) is not None:
            raise SpecError(f"stream {spec.id!r} already exists (use update)")
        self.transport.registry_put(spec.id, spec.model_dump_json())
        self.transport.status_set(spec.id, None)
        logger.info("registered stream %s (%s)", spec.id, spec.url)
        return spec

    def update(self, stream_id: str, changes: dict[str, Any]) -> StreamSpec:
        """Apply ``changes`` (top-level fields; ``tasks`` replaces the task map) to an existing stream."""
        current = self.get(stream_id)
        if "id" in changes and changes["id"] != stream_id:
            raise SpecError("a stream's id cannot change; remove it and add it again")
        merged = current.model_dump() | changes
        if "kind" not in changes and "url" in changes:
            merged["kind"] = None
        return self.add(merged, replace=True)

    def remove(self, stream_id: str) -> None:
        if not self.transport.registry_delete(stream_id):
            raise KeyError(stream_id)
        logger.info("removed stream %s", stream_id)

    def get(self, stream_id: str) -> StreamSpec:
        raw = self.transport.registry_get(stream_id)
        if raw is None:
            raise SpecError(f"no stream {stream_id!r} is registered")
        return StreamSpec.model_validate_json(raw)

    def specs(self) -> list[StreamSpec]:
        """Every registered spec, by id; entries that no longer validate are reported as errors, not raised."""
        out = []
        for stream_id, raw in sorted(self.transport.registry_all().items()):
            try:
                out.append(StreamSpec.model_validate_json(raw))
            except ValidationError as exc:
                self.set_error(stream_id, describe_validation(exc))
        return out

    def records(self) -> list[StreamRecord]:
        status = self.transport.status_all()
        return [StreamRecord(spec=spec, error=status.get(spec.id, {}).get("error"),
                             error_at=status.get(spec.id, {}).get("at")) for spec in self.specs()]

    def set_error(self, stream_id: str, error: str | None) -> None:
        self.transport.status_set(stream_id, error)

    def error(self, stream_id: str) -> str | None:
        return self.transport.status_all().get(stream_id, {}).get("error")

    def health(self, stream_id: str) -> StreamHealth | None:
        return self.transport.health_get(stream_id)
