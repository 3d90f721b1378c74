"""The root settings object: per-subsystem configs read from defaults, an optional YAML file, the environment
(prefix ``VALORA_``, nested with ``__``) and CLI flags, in exactly this one place."""

from __future__ import annotations

import argparse
import contextvars
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from engine.config import EngineConfig

_YAML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("valora_yaml", default=None)


class RedisConfig(BaseModel):
    """Where Redis is, or where the embedded one keeps its data."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None, description="Redis URL (REDIS_URL is read too); unset starts a private embedded Redis."
    )
    state_dir: Path = Field(Path(".state"), description="Directory for the embedded Redis's data and logs.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Seconds to wait for Redis to answer.")


class IngestConfig(BaseModel):
    """How frames are decoded, encoded and published."""

    model_config = ConfigDict(extra="forbid")

    jpeg_quality: int = Field(85, ge=10, le=100, description="JPEG quality of published frames.")
    max_side: int = Field(640, ge=32, le=4096, description="Frames are resized so their longer side fits.")
    stream_maxlen: int = Field(500, ge=10, description="Approximate length cap of each frames stream.")
    media_dir: Path = Field(Path("media"), description="Only files under this directory may be registered.")
    frame_ttl_s: int = Field(
        120, ge=0, description="Seconds a frame's JPEG lives in its own key; 0 carries JPEGs inline in the stream."
    )
    open_timeout_s: float = Field(5.0, gt=0, description="Seconds to wait for a source to open or send data.")
    stall_timeout_s: float = Field(10.0, gt=0, description="The watchdog restarts a decoder silent this long.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First reconnect delay; it doubles on each failure.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Longest reconnect delay (plus up to 25% jitter).")
    rtsp_transport: str = Field("tcp", description="RTSP lower transport: 'tcp' (default) or 'udp'.")
    decoders: list[str] = Field(
        default_factory=lambda: ["pyav", "opencv"], description="Decoders to try, in order (pyav, opencv)."
    )


class WorkerConfig(BaseModel):
    """How task workers consume frames and talk to the engine."""

    model_config = ConfigDict(extra="forbid")

    request_timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for an engine result.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Pending entries idle this long are reclaimed.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries before an entry goes to the dead-letter stream.")
    batch_size: int = Field(4, ge=1, le=256, description="Frames a task worker reads and sends to the engine at once.")
    block_ms: int = Field(500, ge=10, le=10_000, description="Milliseconds a worker blocks waiting for frames.")
    janitor_interval_s: float = Field(5.0, gt=0, description="Seconds between the janitor's pending-entry sweeps.")
    results_maxlen: int = Field(2000, ge=10, description="Approximate length cap of each results stream.")
    summary_interval_s: float = Field(5.0, gt=0, description="Seconds between refreshes of the metrics summary.")


class MetricsConfig(BaseModel):
    """Prometheus exporter settings."""

    model_config = ConfigDict(extra="forbid")

    prometheus_port: int = Field(0, ge=0, le=65535, description="Port of the Prometheus exporter; 0 disables it.")


class ServiceConfig(BaseModel):
    """How the engine service shares valora:engine:requests with its replicas."""

    model_config = ConfigDict(extra="forbid")

    claim_idle_ms: int = Field(
        60_000, ge=100, description="Requests pending on another replica this long are taken over."
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries of a request before it is answered with an error.")
    health_ttl_s: int = Field(10, ge=2, description="Seconds the engine health key lives without a refresh.")
    reply_ttl_s: int = Field(600, ge=10, description="Seconds an idle reply stream is kept.")
    requests_maxlen: int = Field(
        100_000, ge=100, description="Safety cap of the requests stream (answered ones are deleted)."
    )


class ApiConfig(BaseModel):
    """The small HTTP API other tools use to register streams."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP API binds.")
    port: int = Field(8600, ge=0, le=65535, description="Port of the HTTP API (0 picks a free one).")
    token: str | None = Field(
        None, description="Bearer token every API call must carry; the API refuses to start without one."
    )


class UIConfig(BaseModel):
    """Dashboard settings."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(8501, ge=1, le=65535, description="Port the Streamlit dashboard listens on.")
    password_hash: str | None = Field(
        None, description="scrypt hash of the dashboard password (`valora ui hash-password` makes one)."
    )


class Settings(BaseSettings):
    """Everything VaLoRA reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="VALORA_", env_nested_delimiter="__", extra="forbid")

    redis: RedisConfig = Field(default_factory=RedisConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    ui: UIConfig = Field(default_factory=UIConfig)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Precedence, highest first: CLI flags (init), environment, YAML file, defaults.
        sources = [init_settings, env_settings]
        yaml_file = _YAML_FILE.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


class ConfigError(ValueError):
    """The settings could not be read; the message says which field and why."""


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the root settings from defaults < YAML < environment < ``overrides`` (dotted keys allowed)."""
    nested = _nest(overrides or {})
    if "url" not in nested.get("redis", {}) and os.environ.get("REDIS_URL") and not os.environ.get(
        "VALORA_REDIS__URL"
    ):
        nested.setdefault("redis", {})["url"] = os.environ["REDIS_URL"]
    path = Path(config_file) if config_file else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    token = _YAML_FILE.set(path)
    try:
        return Settings(**nested)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    finally:
        _YAML_FILE.reset(token)


def add_config_args(parser: argparse.ArgumentParser, section: str, model: type[BaseModel], fields: list[str]) -> None:
    """Add ``--field-name`` flags for ``fields`` of a config section, with the field descriptions as help."""
    for name in fields:
        info = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": f"cfg:{section}.{name}", "default": argparse.SUPPRESS, "metavar": name.upper(),
        }
        annotation = info.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs.pop("metavar")
        elif annotation in (int, float):
            kwargs["type"] = annotation
        elif getattr(annotation, "__origin__", None) is list:
            kwargs["nargs"] = "*"
        kwargs["help"] = f"{info.description} (default: {info.default!r})"
        parser.add_argument(flag, **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides that ``add_config_args`` flags put on a parsed namespace."""
    return {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg:")}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
