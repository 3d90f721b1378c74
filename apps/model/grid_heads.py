"""Dense heads over the picture's grid of image tokens: a one-stage detector and a referring-expression locator."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from apps.datasets.vocab import CLASSES
from engine.heads import TaskHead


def box_xyxy(box: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_cxcywh(box: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> (cx, cy, w, h)."""
    x1, y1, x2, y2 = box.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matching rows of xyxy boxes; a, b: [n, 4] -> [n]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1).clamp(min=1e-9)
    return inter / union.clamp(min=1e-9) - (hull - union) / hull


def _inside(box: torch.Tensor) -> torch.Tensor:
    """cxcywh boxes [..., 4] with the centre moved into the frame, so that clamping leaves a non-empty box.

    Forward passes leave centres unclamped (a clamp would stop their gradient); decoding clamps them here."""
    return torch.cat([box[..., :2].clamp(0, 1), box[..., 2:]], -1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes; a: [n, 4], b: [m, 4] -> [n, m]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = inter.prod(-1)  # inter: [n, m]
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best first; boxes: [n, 4] xyxy, scores: [n]."""
    order = scores.argsort(descending=True).tolist()
    overlap = pairwise_iou(boxes, boxes)  # overlap: [n, n]
    kept: list[int] = []
    for i in order:
        if all(overlap[i, j] < threshold for j in kept):
            kept.append(i)
    return kept


class CellEncoder(nn.Module):
    """Per-cell features of a rows x cols grid of hidden states, mixed with their neighbours by a 3 x 3 conv.

    The language model is causal, so an image token's state has only seen the tokens before it in raster order;
    the convolution gives every cell its right and lower neighbours too. A learned embedding per cell says where
    the cell is.
    """

    def __init__(self, hidden_size: int, rows: int, cols: int, inner: int) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.proj = nn.Linear(hidden_size, inner)
        self.where = nn.Parameter(torch.zeros(rows * cols, inner))
        self.mix = nn.Conv2d(inner, inner, 3, padding=1)
        self.out = nn.Linear(inner, inner)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        """cells: [batch, rows * cols, hidden_size] -> [batch, rows * cols, inner]."""
        x = nn.functional.gelu(self.proj(cells) + self.where)  # x: [batch, cells, inner]
        grid = x.transpose(1, 2).reshape(len(x), -1, self.rows, self.cols)  # grid: [batch, inner, rows, cols]
        x = x + nn.functional.gelu(self.mix(grid)).flatten(2).transpose(1, 2)
        return nn.functional.gelu(self.out(x))


class GridBoxHead(TaskHead):
    """One-stage detector over the picture's image tokens (as YOLO / FCOS over a feature map).

    Every merged image token is a cell of a rows x cols grid over the frame (row-major, as the image processor
    orders them). A cell predicts per-class objectness (sigmoid) and one box: its centre as an offset from the
    cell's centre, and its size. An object is assigned to the cell holding its centre (the larger object wins a
    shared cell). Decoding keeps every (cell, class) above ``score_threshold`` and applies per-class NMS. The
    prompt is the picture, then ``tail`` tokens (task text and chat template), so the head reads
    ``rows * cols + tail`` trailing positions and uses the first ``rows * cols``.
    """

    kind = "grid-boxes"

    def __init__(self, hidden_size: int, rows: int, cols: int, tail: int, classes: tuple[str, ...] = CLASSES,
                 inner: int = 256, score_threshold: float = 0.02, nms_iou: float = 0.5,
                 adapter: str | None = None) -> None:
        super().__init__()
        self.classes, self.rows, self.cols, self.tail, self.adapter = tuple(classes), rows, cols, tail, adapter
        self.cells = rows * cols
        self.positions = self.cells + tail
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.config = dict(hidden_size=hidden_size, rows=rows, cols=cols, tail=tail, classes=list(classes),
                           inner=inner, score_threshold=score_threshold, nms_iou=nms_iou)
        self.encoder = CellEncoder(hidden_size, rows, cols, inner)
        self.predict = nn.Linear(inner, len(classes) + 4)
        with torch.no_grad():
            self.predict.bias[: len(classes)] = -4.0  # a rare-positive prior, as RetinaNet's
        col = (torch.arange(self.cells) % cols).float()
        row = (torch.arange(self.cells) // cols).float()
        self.register_buffer("centres", torch.stack([(col + 0.5) / cols, (row + 0.5) / rows], -1),
                             persistent=False)  # centres: [cells, 2]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., cells + tail, hidden_size] -> [..., cells, classes + 4]: logits, then cxcywh (the centre
        within 1.5 cells of the cell's, the size in 0..1)."""
        lead = hidden.shape[:-2]
        cells = hidden[..., : self.cells, :].reshape(-1, self.cells, hidden.shape[-1])
        out = self.predict(self.encoder(cells))  # out: [batch, cells, classes + 4]
        n = len(self.classes)
        step = torch.tensor([1.0 / self.cols, 1.0 / self.rows], device=out.device)
        centre = self.centres + torch.tanh(out[..., n : n + 2]) * step * 1.5  # a neighbour cell at most
        size = torch.sigmoid(out[..., n + 2 :] - 2.0)
        return torch.cat([out[..., :n], centre, size], -1).reshape(*lead, self.cells, n + 4)

    def decode(self, output: torch.Tensor) -> dict[str, Any]:
        n = len(self.classes)
        scores = output[:, :n].sigmoid()  # scores: [cells, classes]
        boxes = box_xyxy(_inside(output[:, n:])).clamp(0, 1)  # boxes: [cells, 4]
        detections = []
        for c, cls in enumerate(self.classes):
            keep = (scores[:, c] >= self.score_threshold).nonzero().flatten()
            if len(keep) == 0:
                continue
            for i in nms(boxes[keep], scores[keep, c], self.nms_iou):
                box = boxes[keep[i]].tolist()
                if box[2] > box[0] and box[3] > box[1]:
                    detections.append({"cls": cls, "box": [round(v, 4) for v in box],
                                       "score": round(float(scores[keep[i], c]), 4)})
        detections.sort(key=lambda d: -d["score"])
        return {"detections": detections[:100]}

    def target(self, answer: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's head answer ({"detections": [{"cls", "box"}]}) -> (labels [n], xyxy boxes [n, 4])."""
        known = [d for d in answer["detections"] if d["cls"] in self.classes]
        labels = torch.tensor([self.classes.index(d["cls"]) for d in known], dtype=torch.long)
        boxes = torch.tensor([d["box"] for d in known], dtype=torch.float32).reshape(-1, 4)
        return labels, boxes

    def assign(self, labels: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class per cell [cells], -1 for background; box per cell [cells, 4] xyxy) for one frame's objects."""
        cls = torch.full((self.cells,), -1, dtype=torch.long)
        true = torch.zeros(self.cells, 4)
        centre = box_cxcywh(boxes)
        col = (centre[:, 0] * self.cols).long().clamp(0, self.cols - 1)
        row = (centre[:, 1] * self.rows).long().clamp(0, self.rows - 1)
        area = centre[:, 2] * centre[:, 3]
        for i in area.argsort().tolist():  # smallest first, so a larger object sharing the cell overwrites it
            cell = int(row[i] * self.cols + col[i])
            cls[cell], true[cell] = labels[i], boxes[i]
        return cls, true

    def loss(self, output: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
             l1_weight: float = 5.0, giou_weight: float = 2.0) -> torch.Tensor:
        """Focal loss on every (cell, class), L1 + GIoU on the boxes of assigned cells.

        output: [batch, cells, classes + 4]; targets: (labels [n], xyxy boxes [n, 4]) per row."""
        n = len(self.classes)
        assigned = [self.assign(*t) for t in targets]
        cls = torch.stack([a[0] for a in assigned]).to(output.device)  # cls: [batch, cells]
        true = torch.stack([a[1] for a in assigned]).to(output.device)  # true: [batch, cells, 4]
        logits = output[..., :n]
        onehot = nn.functional.one_hot(cls.clamp(min=0), n).float() * (cls >= 0)[..., None].float()
        prob = logits.sigmoid()
        ce = nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        p_t = prob * onehot + (1 - prob) * (1 - onehot)
        alpha = 0.25 * onehot + 0.75 * (1 - onehot)
        positive = cls >= 0
        count = max(1.0, float(positive.sum()))
        loss = (alpha * (1 - p_t) ** 2 * ce).sum() / count
        if positive.any():
            pred, gold = output[..., n:][positive], true[positive]  # [positives, 4] cxcywh and xyxy
            loss = loss + l1_weight * (pred - box_cxcywh(gold)).abs().sum(-1).mean()
            loss = loss + giou_weight * (1 - paired_giou(box_xyxy(pred), gold)).mean()
        return loss



class GroundingHead(TaskHead):
    """The box a referring expression names: the picture's cells scored against the expression.

    The head reads the last ``positions`` prompt states: <|vision_start|>, the picture's rows x cols image tokens,
    then the tail (task text with the expression, chat template). Expressions vary in length, so the picture's
    place in that window varies: the head finds it by the state of <|vision_start|>, which follows only the fixed
    chat prefix and so is one vector per adapter (``anchor``, stored with the head). A window reaches ``slack``
    positions before the picture, so tails of ``tail - slack`` .. ``tail`` tokens are served; for longer ones
    the picture is not in the window and the answer has no box.

    The expression (last prompt state) modulates every cell's features; one attention layer over the cells lets
    them compare (the "leftmost" person); every cell gets a logit for holding the referred object's centre and
    a box. The answer is the best cell's box.
    """

    kind = "ref-box"

    def __init__(self, hidden_size: int, rows: int, cols: int, tail: int, slack: int = 4, inner: int = 128,
                 adapter: str | None = None) -> None:
        super().__init__()
        self.rows, self.cols, self.cells, self.tail, self.slack = rows, cols, rows * cols, tail, slack
        self.positions, self.adapter = 1 + self.cells + tail, adapter
        self.config = dict(hidden_size=hidden_size, rows=rows, cols=cols, tail=tail, slack=slack, inner=inner)
        self.register_buffer("anchor", torch.zeros(hidden_size))  # the <|vision_start|> state under the adapter
        self.encoder = CellEncoder(hidden_size, rows, cols, inner)
        self.query = nn.Linear(hidden_size, 2 * inner)
        self.mix = nn.TransformerEncoderLayer(inner, 4, 2 * inner, dropout=0.0, batch_first=True)
        self.predict = nn.Linear(inner, 5)
        col = (torch.arange(self.cells) % cols).float()
        row = (torch.arange(self.cells) // cols).float()
        self.register_buffer("centres", torch.stack([(col + 0.5) / cols, (row + 0.5) / rows], -1),
                             persistent=False)  # centres: [cells, 2]

    def calibrate(self, state: torch.Tensor) -> None:
        """Remember the current <|vision_start|> state ([hidden_size]); the trainer calls this as the adapter
        changes."""
        self.anchor.copy_(state.detach())

    def locate(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index of <|vision_start|> in each window [batch], whether it was found [batch]); window: [batch, W, d].

        It lies in the first ``slack + 1`` positions when the tail fits; found means the nearest state there is
        the anchor itself (within 5% of its norm: serving may run at lower precision)."""
        gap = (window[:, : self.slack + 1] - self.anchor).norm(dim=-1)  # gap: [batch, slack + 1]
        best, index = gap.min(-1)
        return index, best <= 0.05 * self.anchor.norm().clamp(min=1e-6)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., positions, hidden_size] -> [..., cells, 6]: cell logit, box (cxcywh, as the detector's),
        whether the picture was found (1.0 or 0.0)."""
        lead = hidden.shape[:-2]
        window = hidden.reshape(-1, *hidden.shape[-2:])  # window: [batch, positions, hidden]
        start, found = self.locate(window)
        index = start[:, None] + 1 + torch.arange(self.cells, device=window.device)  # index: [batch, cells]
        cells = window.gather(1, index[..., None].expand(-1, -1, window.shape[-1]))  # [batch, cells, hidden]
        out = self.score(cells, window[:, -1])
        flag = found[:, None, None].float().expand(-1, self.cells, 1)
        return torch.cat([out, flag], -1).reshape(*lead, self.cells, 6)

    def score(self, cells: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """cells: [batch, cells, hidden], expression: [batch, hidden] -> [batch, cells, 5] (logit, cxcywh)."""
        scale, shift = self.query(expression)[:, None].chunk(2, -1)  # each [batch, 1, inner]
        x = self.mix(self.encoder(cells) * (1 + scale) + shift)  # x: [batch, cells, inner]
        out = self.predict(x)
        step = torch.tensor([1.0 / self.cols, 1.0 / self.rows], device=out.device)
        centre = self.centres + torch.tanh(out[..., 1:3]) * step * 1.5
        return torch.cat([out[..., :1], centre, torch.sigmoid(out[..., 3:] - 2.0)], -1)

    def cell_of(self, box: torch.Tensor) -> torch.Tensor:
        """Cell index holding the centre of xyxy boxes; box: [..., 4] -> [...]."""
        centre = box_cxcywh(box)[..., :2]
        col = (centre[..., 0] * self.cols).long().clamp(0, self.cols - 1)
        row = (centre[..., 1] * self.rows).long().clamp(0, self.rows - 1)
        return row * self.cols + col

    def decode(self, output: torch.Tensor) -> dict[str, Any]:
        if output[0, 5] < 0.5:  # the picture was not in the window: the expression is too long for this head
            return {"box": None, "score": 0.0}
        probs = output[:, 0].softmax(-1)  # probs: [cells]
        cell = int(probs.argmax())
        box = box_xyxy(_inside(output[cell, 1:5])).clamp(0, 1)
        return {"box": [round(v, 4) for v in box.tolist()], "score": round(float(probs[cell]), 4)}

    def target(self, answer: dict[str, Any]) -> torch.Tensor:
        """The task's head answer ({"box": [x1, y1, x2, y2] in 0..1}) -> xyxy [4]."""
        return torch.tensor(answer["box"], dtype=torch.float32)

    def loss(self, output: torch.Tensor, targets: list[torch.Tensor], l1_weight: float = 5.0,
             giou_weight: float = 2.0) -> torch.Tensor:
        """Cross-entropy on the cell of the true centre, L1 + GIoU on that cell's box; output: [batch, cells, 6],
        targets: one xyxy [4] per row."""
        true = torch.stack(targets).to(output.device)  # true: [batch, 4]
        gold = self.cell_of(true)  # gold: [batch]
        loss = nn.functional.cross_entropy(output[..., 0], gold)
        pred = output[torch.arange(len(true), device=output.device), gold, 1:5]  # pred: [batch, 4] cxcywh
        loss = loss + l1_weight * (pred - box_cxcywh(true)).abs().sum(-1).mean()
        return loss + giou_weight * (1 - paired_giou(box_xyxy(pred), true)).mean()
