"""VaLoRA vision task heads: a count classifier and a DETR-style box head, saved beside their adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apps.datasets.vocab import CLASSES
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


def box_xyxy(box: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_cxcywh(box: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes; a: [n, 4], b: [m, 4] -> [n, m]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # inter: [n, m]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.max(a[:, None, 2:], b[None, :, 2:]) - torch.min(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    hull_area = hull.prod(-1).clamp(min=1e-9)
    return iou - (hull_area - union) / hull_area


def anchor_points(rows: int, cols: int) -> torch.Tensor:
    """Centres of a rows x cols grid over the frame, row-major: [rows * cols, 2] (cx, cy)."""
    cx = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    cy = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    return torch.stack(torch.meshgrid(cx, cy, indexing="xy"), -1).reshape(-1, 2)


class BoxHead(TaskHead):
    """DETR-style set prediction over a fixed grid of query positions: the picture's image tokens.

    Each merged image token (row-major over the rows x cols grid the image processor gives a frame) is a query:
    its final hidden state gives class logits (plus no-object) and a box whose centre is an offset from the
    token's cell centre, as Anchor-DETR's reference points. Training matches queries to objects one-to-one with
    the Hungarian algorithm. The prompt is the picture, then ``tail`` tokens (the task text and the chat
    template), so the head reads ``rows * cols + tail`` positions and uses the first ``rows * cols``; it serves
    frames whose processed grid is rows x cols (224 x 224 synthetic frames: 6 x 6).
    """

    kind = "boxes"

    def __init__(self, hidden_size: int, rows: int, cols: int, tail: int, classes: tuple[str, ...] = CLASSES,
                 inner: int = 256, score_threshold: float = 0.05, adapter: str | None = None) -> None:
        super().__init__()
        self.classes, self.rows, self.cols, self.tail, self.adapter = tuple(classes), rows, cols, tail, adapter
        self.queries = rows * cols
        self.positions = self.queries + tail
        self.score_threshold = score_threshold
        self.config = dict(hidden_size=hidden_size, rows=rows, cols=cols, tail=tail, classes=list(classes),
                           inner=inner, score_threshold=score_threshold)
        self.mlp = _mlp(hidden_size, inner, len(classes) + 1 + 4)
        self.register_buffer("anchors", torch.logit(anchor_points(rows, cols)), persistent=False)  # [queries, 2]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., queries + tail, hidden_size] -> [..., queries, classes + 1 + 4] (logits, cxcywh in 0..1)."""
        out = self.mlp(hidden[..., : self.queries, :])
        logits, box = out[..., : len(self.classes) + 1], out[..., len(self.classes) + 1 :]
        centre = (box[..., :2] + self.anchors).sigmoid()
        return torch.cat([logits, centre, box[..., 2:].sigmoid()], -1)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [..., queries, classes + 1], boxes [..., queries, 4] xyxy)."""
        n = len(self.classes) + 1
        return output[..., :n], box_xyxy(output[..., n:])

    def decode(self, output: torch.Tensor) -> dict[str, Any]:
        logits, boxes = self.split(output)
        probs = logits.softmax(-1)[:, : len(self.classes)]  # probs: [queries, classes], no-object dropped
        scores, labels = probs.max(-1)
        detections = []
        for score, label, box in zip(scores.tolist(), labels.tolist(), boxes.clamp(0, 1).tolist(), strict=True):
            if score >= self.score_threshold and box[2] > box[0] and box[3] > box[1]:
                detections.append({"cls": self.classes[label], "box": [round(v, 4) for v in box],
                                   "score": round(score, 4)})
        detections.sort(key=lambda d: -d["score"])
        return {"detections": detections}

    def target(self, answer: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's head answer ({"detections": [{"cls", "box"}]}) -> (labels [n], xyxy boxes [n, 4])."""
        known = [d for d in answer["detections"] if d["cls"] in self.classes]
        labels = torch.tensor([self.classes.index(d["cls"]) for d in known], dtype=torch.long)
        boxes = torch.tensor([d["box"] for d in known], dtype=torch.float32).reshape(-1, 4)
        return labels, boxes

    def loss(self, output: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
             no_object_weight: float = 0.1, l1_weight: float = 5.0, giou_weight: float = 2.0) -> torch.Tensor:
        """DETR's set loss with Hungarian matching; output: [batch, queries, classes + 5]."""
        from apps.model.assignment import assignment

        logits, boxes = self.split(output)
        n_cls = len(self.classes)
        class_weight = torch.ones(n_cls + 1, device=output.device)
        class_weight[n_cls] = no_object_weight
        gold = torch.full(logits.shape[:-1], n_cls, dtype=torch.long, device=output.device)  # gold: [batch, queries]
        matched_pred, matched_true = [], []
        for row, (labels, true_boxes) in enumerate(targets):
            if len(labels) == 0:
                continue
            with torch.no_grad():
                prob = logits[row].softmax(-1)[:, labels]  # prob: [queries, n]
                cost = (-prob + l1_weight * torch.cdist(box_cxcywh(boxes[row]), box_cxcywh(true_boxes), p=1)
                        - giou_weight * generalized_iou(boxes[row], true_boxes))
            pairs = assignment(cost.T.tolist())  # (true index, query index)
            index_true = torch.tensor([t for t, _ in pairs])
            index_query = torch.tensor([q for _, q in pairs])
            gold[row, index_query] = labels[index_true]
            matched_pred.append(boxes[row, index_query])
            matched_true.append(true_boxes[index_true])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), gold.flatten(), weight=class_weight)
        if matched_pred:
            pred, true = torch.cat(matched_pred), torch.cat(matched_true)  # [matches, 4] each
            n = max(1, len(pred))
            loss = loss + l1_weight * (box_cxcywh(pred) - box_cxcywh(true)).abs().sum() / n
            loss = loss + giou_weight * (1 - torch.diagonal(generalized_iou(pred, true))).sum() / n
        return loss


HEAD_TYPES: dict[str, type[TaskHead]] = {CountingHead.kind: CountingHead, BoxHead.kind: BoxHead}


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
