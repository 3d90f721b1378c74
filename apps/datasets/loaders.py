"""Loaders for user data: COCO detection JSON, RefCOCO-style referring expressions, LLaVA-style conversations."""

from __future__ import annotations

import io
import json
import logging
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apps.datasets.sample import Sample
from apps.datasets.schema import QA, FrameTruth, ObjectTruth, RefExpr

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class LoadedDataset:
    """Samples of one file plus its class names (build tasks over them, e.g. DetectionTask(classes=...))."""

    samples: list[Sample]
    classes: tuple[str, ...]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CocoImage(_Lenient):
    id: int
    file_name: str
    width: int
    height: int


class CocoAnnotation(_Lenient):
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    iscrowd: int = 0


class CocoCategory(_Lenient):
    id: int
    name: str


class CocoFile(_Lenient):
    images: list[CocoImage]
    annotations: list[CocoAnnotation] = []
    categories: list[CocoCategory]


class RefSentence(_Lenient):
    sent: str


class RefRecord(_Lenient):
    ref_id: int | None = None
    ann_id: int
    image_id: int
    split: str | None = None
    sentences: list[RefSentence]


class Turn(_Lenient):
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class Conversation(_Lenient):
    id: str | int | None = None
    image: str | None = None
    conversations: list[Turn]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "top level"
    return f"{where}: {error['msg']}"


def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _validate(model: type[BaseModel], data: Any, path: Path, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: not a {what} ({_first_error(exc)})") from None


def _clipped_box(bbox: Sequence[float], width: int, height: int) -> list[float] | None:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] clipped to the image; None when nothing of it is inside."""
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise ValueError(f"bbox {list(bbox)} has a negative size")
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def _coco_tables(coco: CocoFile, path: Path):
    """Images by id, category names by id, and each image's objects (crowd regions left out)."""
    images = {img.id: img for img in coco.images}
    names = {cat.id: cat.name for cat in coco.categories}
    if len(set(names.values())) != len(names):
        raise ValueError(f"{path}: category names are not unique")
    objects: dict[int, list[ObjectTruth]] = {img_id: [] for img_id in images}
    boxes: dict[int, list[float]] = {}
    crowd = 0
    for n, ann in enumerate(coco.annotations):
        if ann.image_id not in images:
            raise ValueError(f"{path}: annotations.{n} refers to unknown image_id {ann.image_id}")
        if ann.category_id not in names:
            raise ValueError(f"{path}: annotations.{n} refers to unknown category_id {ann.category_id}")
        img = images[ann.image_id]
        try:
            box = _clipped_box(ann.bbox, img.width, img.height)
        except ValueError as exc:
            raise ValueError(f"{path}: annotations.{n}: {exc}") from None
        if box is None:
            continue
        boxes[ann.id] = box
        if ann.iscrowd:
            crowd += 1
            continue
        objects[ann.image_id].append(ObjectTruth(track_id=ann.id, cls=names[ann.category_id], box=box))
    if crowd:
        logger.info("%s: left out %s crowd regions (no single object to find)", path, crowd)
    return images, names, objects, boxes


def _truth(img: CocoImage, objects: list[ObjectTruth], classes: Sequence[str], **text: Any) -> FrameTruth:
    tally = Counter(o.cls for o in objects)
    counts = {cls: tally.get(cls, 0) for cls in classes}
    return FrameTruth(frame=img.id, width=img.width, height=img.height, objects=objects, counts=counts, **text)


def load_coco(annotations: Path, image_root: Path | None = None) -> LoadedDataset:
    """One sample per image of a COCO detection file; boxes clipped to the image, crowd regions left out.
    Image paths are image_root / file_name (default: the JSON's folder); pixels are read on demand."""
    path = Path(annotations)
    coco = _validate(CocoFile, _read_json(path), path, "COCO detection file")
    images, names, objects, _ = _coco_tables(coco, path)
    classes = tuple(names.values())
    root = Path(image_root) if image_root is not None else path.parent
    samples = [
        Sample(truth=_truth(img, objects[img.id], classes), path=root / img.file_name) for img in images.values()
    ]
    return LoadedDataset(samples=samples, classes=classes)


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain lists, dicts, strings and numbers only; any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise ValueError(f"refuses to load {module}.{name}: a refs file holds only plain data")


def _read_refs(path: Path) -> list[Any]:
    path = Path(path)
    if path.suffix in (".p", ".pkl", ".pickle"):
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
        try:
            data = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: not a plain-data refs pickle ({exc})") from None
    elif path.suffix == ".jsonl":
        data = [_parse_line(line, path, n) for n, line in _lines(path)]
    else:
        data = _read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of referring-expression records")
    return data


def load_refcoco(
    refs: Path, instances: Path, image_root: Path | None = None, split: str | None = None
) -> LoadedDataset:
    """One sample per image with referring expressions (the refs(unc).p records, as pickle, JSON or JSONL), boxes
    from the COCO instances file. An expression text that names two different objects of one image is dropped."""
    instances_path = Path(instances)
    coco = _validate(CocoFile, _read_json(instances_path), instances_path, "COCO instances file")
    images, names, objects, boxes = _coco_tables(coco, instances_path)
    by_image: dict[int, dict[str, RefExpr | None]] = {}
    for n, raw in enumerate(_read_refs(refs)):
        record = _validate(RefRecord, raw, Path(refs), f"referring-expression record (item {n})")
        if split is not None and record.split != split:
            continue
        if record.image_id not in images or record.ann_id not in boxes:
            raise ValueError(f"{refs}: record {n} refers to unknown image {record.image_id} or ann {record.ann_id}")
        exprs = by_image.setdefault(record.image_id, {})
        for sentence in record.sentences:
            text = " ".join(sentence.sent.split())
            if not text:
                continue
            ref = RefExpr(expr=text, track_id=record.ann_id, box=boxes[record.ann_id])
            seen = exprs.get(text, ref)
            exprs[text] = ref if seen is not None and seen.track_id == ref.track_id else None
    classes = tuple(names.values())
    root = Path(image_root) if image_root is not None else instances_path.parent
    samples = []
    for image_id, exprs in by_image.items():
        kept = [ref for ref in exprs.values() if ref is not None]
        if len(kept) < len(exprs):
            logger.info("image %s: dropped %s ambiguous expressions", image_id, len(exprs) - len(kept))
        img = images[image_id]
        samples.append(Sample(truth=_truth(img, objects[image_id], classes, refs=kept), path=root / img.file_name))
    return LoadedDataset(samples=samples, classes=classes)


def _lines(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                yield n, line


def _parse_line(line: str, path: Path, n: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.size
    except UnidentifiedImageError:
        raise ValueError(f"not an image: {path}") from None


def load_llava(path: Path, image_root: Path | None = None, kind: Literal["vqa", "caption"] = "vqa") -> LoadedDataset:
    """LLaVA-style conversations (a JSON list or JSONL). kind='vqa' turns every human/gpt exchange into a QA
    (the '<image>' token removed); kind='caption' takes the first reply as the caption. Records without an image
    are skipped. Image sizes are read from the image files' headers."""
    if kind not in ("vqa", "caption"):
        raise ValueError(f"kind must be 'vqa' or 'caption', got {kind!r}")
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [_parse_line(line, path, n) for n, line in _lines(path)]
    else:
        records = _read_json(path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of conversation records")
    root = Path(image_root) if image_root is not None else path.parent
    samples, skipped = [], 0
    for n, raw in enumerate(records):
        record = _validate(Conversation, raw, path, f"LLaVA conversation record (item {n})")
        if record.image is None:
            skipped += 1
            continue
        turns = record.conversations
        if len(turns) < 2 or len(turns) % 2 or any(t.speaker != ("human", "gpt")[i % 2] for i, t in enumerate(turns)):
            raise ValueError(f"{path}: record {n} must alternate human and gpt turns, starting with human")
        pairs = [
            (" ".join(q.value.replace(IMAGE_TOKEN, " ").split()), a.value.strip())
            for q, a in zip(turns[::2], turns[1::2], strict=True)
        ]
        image_path = root / record.image
        width, height = _image_size(image_path)
        if kind == "caption":
            text = {"caption": pairs[0][1]}
        else:
            unique = {q: a for q, a in reversed(pairs)}  # the first answer to a repeated question wins
            text = {"vqa": [QA(question=q, answer=unique[q]) for q in dict.fromkeys(q for q, _ in pairs)]}
        truth = FrameTruth(frame=n, width=width, height=height, **text)
        samples.append(Sample(truth=truth, path=image_path))
    if skipped:
        logger.info("%s: skipped %s records without an image", path, skipped)
    return LoadedDataset(samples=samples, classes=())
