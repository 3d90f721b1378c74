"""The adapter directory: PEFT-format LoRA adapters (adapter_config.json + adapter_model.safetensors) by name."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_RANK = 256


class AdapterError(ValueError):
    """An adapter is unknown, or its files are missing or malformed."""


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter's config says about it."""

    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @property
    def scaling(self) -> float:
        """The factor PEFT applies to B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_weights(folder: Path, label: str) -> dict:
    """The folder's adapter weights file as CPU tensors; AdapterError naming ``label`` if it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{label}: {path.name} is corrupt or unreadable ({exc})") from None


def read_adapter_spec(path: str | Path, name: str | None = None) -> AdapterSpec:
    """Validate an adapter folder and read its config; raises AdapterError with the reason."""
    folder = Path(path)
    name = name or folder.name
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r}: {cfg_path} is missing")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterError(f"adapter {name!r}: {folder / WEIGHTS_FILE} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} must hold an object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    rank = cfg.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterError(f"adapter {name!r}: rank r={rank!r} must be an integer in 1..{MAX_RANK}")
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"adapter {name!r}: lora_alpha={alpha!r} must be a positive number")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return AdapterSpec(
        name=name,
        path=folder,
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=tuple(targets),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
    )


class AdapterStore:
    """Adapters found under one directory, one sub-folder each; re-scanned on a miss."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._specs: dict[str, AdapterSpec] = {}
        self._extra: dict[str, AdapterSpec] = {}
        self.rescan()

    def rescan(self) -> None:
        self._specs = dict(self._extra)
        if not self.root.is_dir():
            return
        from engine.moe.spec import is_moe_folder  # its own store serves MoE-LoRA adapters

        for folder in sorted(p for p in self.root.iterdir() if (p / CONFIG_FILE).is_file()):
            if is_moe_folder(folder):
                continue
            try:
                self._specs[folder.name] = read_adapter_spec(folder)
            except AdapterError as exc:
                logger.warning("skipping adapter: %s", exc)

    def add(self, spec: AdapterSpec) -> None:
        """Know an adapter that has no folder here (built in memory); a rescan keeps it."""
        self._extra[spec.name] = spec
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> AdapterSpec:
        if name not in self._specs:
            self.rescan()
        if name not in self._specs:
            # A folder that failed validation gets its real reason, not "unknown".
            folder = self.root / name
            if folder.is_dir():
                return read_adapter_spec(folder)
            known = ", ".join(self.names()) or "none"
            raise AdapterError(f"unknown adapter {name!r} (known: {known})")
        return self._specs[name]
