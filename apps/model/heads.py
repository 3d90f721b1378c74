"""VaLoRA vision task heads (a count classifier here, the grid heads in grid_heads.py), saved beside their adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apps.datasets.vocab import CLASSES
from apps.model.grid_heads import GridBoxHead, GroundingHead
from engine.heads import TaskHead

logger = logging.getLogger(__name__)

HEADS_DIR = "heads"  # sub-folder of an adapter that holds its heads: <name>.json + <name>.safetensors


def _mlp(dim: int, inner: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, inner), nn.GELU(), nn.Linear(inner, out))


class CountingHead(TaskHead):
    """Per-class count classifier on the last prompt position: counts 0..max_count for every class."""

    kind = "counts"

    def __init__(self, hidden_size: int, classes: tuple[str, ...] = CLASSES, max_count: int = 10,
                 inner: int = 256, adapter: str | None = None) -> None:
        super().__init__()
        self.classes, self.max_count, self.positions, self.adapter = tuple(classes), max_count, 1, adapter
        self.config = dict(hidden_size=hidden_size, classes=list(classes), max_count=max_count, inner=inner)
        self.mlp = _mlp(hidden_size, inner, len(classes) * (max_count + 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., 1, hidden_size] -> logits [..., classes, max_count + 1]."""
        logits = self.mlp(hidden[..., -1, :])
        return logits.view(*logits.shape[:-1], len(self.classes), self.max_count + 1)

    def decode(self, output: torch.Tensor) -> dict[str, Any]:
        counts = output.argmax(-1).tolist()  # [classes]
        return {"counts": {cls: int(n) for cls, n in zip(self.classes, counts, strict=True)}}

    def target(self, answer: dict[str, Any]) -> torch.Tensor:
        """The task's head answer ({"counts": {class: n}}) -> class indices [classes], clamped to max_count."""
        counts = answer["counts"]
        return torch.tensor([min(int(counts.get(cls, 0)), self.max_count) for cls in self.classes])

    def loss(self, output: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """output: [batch, classes, max_count + 1]; targets: one [classes] tensor per row."""
        gold = torch.stack(targets)  # gold: [batch, classes]
        return nn.functional.cross_entropy(output.flatten(0, 1), gold.flatten())


HEAD_TYPES: dict[str, type[TaskHead]] = {
    head.kind: head for head in (CountingHead, GridBoxHead, GroundingHead)}


def save_head(adapter_dir: str | Path, name: str, head: TaskHead) -> Path:
    """Write heads/<name>.json (kind, adapter, config) and heads/<name>.safetensors (fp16; loads as fp32)."""
    from safetensors.torch import save_file

    folder = Path(adapter_dir) / HEADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "kind": head.kind, "adapter": head.adapter, "config": head.config}
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().half().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / f"{name}.safetensors"))
    return folder / f"{name}.json"


def load_head(meta_path: str | Path) -> tuple[str, TaskHead]:
    """(name, head in eval mode, fp32) from a heads/<name>.json written by save_head."""
    from safetensors.torch import load_file

    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
        cls = HEAD_TYPES[meta["kind"]]
        config = dict(meta["config"])
        if "classes" in config:
            config["classes"] = tuple(config["classes"])
        head = cls(**config, adapter=meta.get("adapter"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"task head {meta_path} is malformed: {exc!r}") from None
    weights = meta_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ValueError(f"task head {meta_path}: {weights.name} is missing")
    head.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return meta["name"], head.float().eval()


def load_heads(adapters_dir: str | Path) -> dict[str, TaskHead]:
    """Every task head saved under any adapter of a directory, by head name (each knows its adapter)."""
    heads: dict[str, TaskHead] = {}
    root = Path(adapters_dir)
    if not root.is_dir():
        return heads
    for meta_path in sorted(root.glob(f"*/{HEADS_DIR}/*.json")):
        name, head = load_head(meta_path)
        if name in heads:
            raise ValueError(f"task head {name!r} is saved under two adapters ({heads[name].adapter}, {head.adapter})")
        heads[name] = head
        logger.info("loaded task head %s (%s) of adapter %s", name, head.kind, head.adapter)
    return heads
