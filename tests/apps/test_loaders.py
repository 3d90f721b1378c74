"""Loaders for user data on small files written by the tests: COCO, RefCOCO-style, LLaVA-style."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from apps.datasets.loaders import load_coco, load_llava, load_refcoco
from apps.tasks.captioning import CaptioningTask
from apps.tasks.counting import CountingTask
from apps.tasks.detection import DetectionTask
from apps.tasks.grounding import GroundingTask
from apps.tasks.vqa import VQATask

COCO = {
    "info": {"description": "tiny"},
    "images": [
        {"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
        {"id": 9, "file_name": "b.jpg", "width": 50, "height": 50},
    ],
    "categories": [{"id": 1, "name": "dog"}, {"id": 3, "name": "Traffic-Light"}, {"id": 5, "name": "cat"}],
    "annotations": [
        {"id": 11, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
        {"id": 12, "image_id": 7, "category_id": 3, "bbox": [90, 70, 20, 20], "iscrowd": 0},  # leaves the image
        {"id": 13, "image_id": 7, "category_id": 1, "bbox": [40, 10, 20, 30], "iscrowd": 1},  # crowd region
        {"id": 14, "image_id": 9, "category_id": 1, "bbox": [5, 5, 10, 10]},
        {"id": 15, "image_id": 9, "category_id": 1, "bbox": [25, 5, 10, 10]},
    ],
}


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_coco_maps_images_to_frame_truths(tmp_path):
    data = load_coco(_write(tmp_path / "instances.json", COCO))
    assert data.classes == ("dog", "Traffic-Light", "cat")
    first, second = data.samples
    assert first.path == tmp_path / "a.jpg" and first.truth.frame == 7
    assert [(o.track_id, o.cls, o.box) for o in first.truth.objects] == [
        (11, "dog", [10, 10, 30, 40]),
        (12, "Traffic-Light", [90, 70, 100, 80]),  # clipped to the image
    ]
    assert first.truth.counts == {"dog": 1, "Traffic-Light": 1, "cat": 0}
    assert second.truth.counts == {"dog": 2, "Traffic-Light": 0, "cat": 0}
    # The task modules work on the user's classes: perfect text scores 100.
    task = DetectionTask(classes=data.classes)
    truths = [s.truth for s in data.samples]
    outputs = [task.parse_text(task.target_text(t)) for t in truths]
    assert not any(o.parse_error for o in outputs)
    assert task.evaluate(outputs, truths)["map50"] == pytest.approx(100.0)
    counting = CountingTask(classes=data.classes)
    counted = [counting.parse_text(counting.target_text(t)) for t in truths]
    assert [c.counts for c in counted] == [t.counts for t in truths] and not any(c.parse_error for c in counted)


def test_coco_reads_pixels_on_demand(tmp_path):
    Image.fromarray(np.full((80, 100, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    data = load_coco(_write(tmp_path / "instances.json", COCO), image_root=tmp_path)
    assert data.samples[0].rgb().shape == (80, 100, 3)
    with pytest.raises(FileNotFoundError, match="b.jpg"):
        data.samples[1].rgb()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("images"), "images"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown image_id 99"),
        (lambda d: d["annotations"][0].update(category_id=2), "unknown category_id 2"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "negative size"),
        (lambda d: d["categories"].append({"id": 8, "name": "dog"}), "not unique"),
        (lambda d: d["images"][0].update(width="wide"), "width"),
    ],
)
def test_malformed_coco_files_raise_a_clear_value_error(tmp_path, mutate, message):
    data = json.loads(json.dumps(COCO))
    mutate(data)
    with pytest.raises(ValueError, match=message):
        load_coco(_write(tmp_path / "bad.json", data))


def test_missing_and_non_json_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_coco(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco(tmp_path / "junk.json")


REFS = [
    {"ref_id": 1, "ann_id": 11, "image_id": 7, "split": "train", "category_id": 1,
     "sentences": [{"sent": "the dog on the left", "tokens": []}, {"sent": "brown  dog"}]},
    {"ref_id": 2, "ann_id": 12, "image_id": 7, "split": "train", "sentences": [{"sent": "the light"}]},
    {"ref_id": 3, "ann_id": 14, "image_id": 9, "split": "val", "sentences": [{"sent": "dog"}, {"sent": "left dog"}]},
    {"ref_id": 4, "ann_id": 15, "image_id": 9, "split": "val", "sentences": [{"sent": "dog"}, {"sent": "right dog"}]},
]  # fmt: skip


def test_refcoco_from_json_and_pickle(tmp_path):
    instances = _write(tmp_path / "instances.json", COCO)
    json_refs = _write(tmp_path / "refs.json", REFS)
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(REFS, protocol=2))
    for refs in (json_refs, tmp_path / "refs(unc).p"):
        data = load_refcoco(refs, instances)
        by_image = {s.truth.frame: s.truth for s in data.samples}
        assert [(r.expr, r.track_id, r.box) for r in by_image[7].refs] == [
            ("the dog on the left", 11, [10, 10, 30, 40]),
            ("brown dog", 11, [10, 10, 30, 40]),
            ("the light", 12, [90, 70, 100, 80]),
        ]
        # "dog" names two objects of image 9: it is ambiguous and dropped.
        assert [r.expr for r in by_image[9].refs] == ["left dog", "right dog"]
    val = load_refcoco(json_refs, instances, split="val")
    assert [s.truth.frame for s in val.samples] == [9]
    task = GroundingTask()
    truth = val.samples[0].truth
    outputs = [task.parse_text(task.target_text(truth, r.expr)).model_copy(update={"item": r.expr}) for r in truth.refs]
    assert task.evaluate(outputs, [truth] * len(outputs)) == {"acc50": 100.0}


def test_refcoco_errors(tmp_path):
    instances = _write(tmp_path / "instances.json", COCO)
    bad = _write(tmp_path / "refs.json", [{"ann_id": 999, "image_id": 7, "sentences": [{"sent": "x"}]}])
    with pytest.raises(ValueError, match="unknown image 7 or ann 999"):
        load_refcoco(bad, instances)
    with pytest.raises(ValueError, match="sentences"):
        load_refcoco(_write(tmp_path / "r2.json", [{"ann_id": 11, "image_id": 7}]), instances)
    with pytest.raises(ValueError, match="list"):
        load_refcoco(_write(tmp_path / "r3.json", {"refs": []}), instances)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "evil.p").write_bytes(pickle.dumps([Exploit()]))
    with pytest.raises(ValueError, match="plain"):
        load_refcoco(tmp_path / "evil.p", instances)
    assert not (tmp_path / "pwned").exists()


def _llava_records():
    return [
        {"id": "a", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the car?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many people are there?"}, {"from": "gpt", "value": "2"},
            {"from": "human", "value": "What colour is the car?"}, {"from": "gpt", "value": "Blue"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "b", "image": "img/b.png", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A bus on a road."}]},
    ]  # fmt: skip


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_conversations_for_vqa_and_captions(tmp_path, suffix):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "img/a.png")
    Image.fromarray(np.zeros((20, 60, 3), np.uint8)).save(tmp_path / "img/b.png")
    path = tmp_path / f"chat{suffix}"
    records = _llava_records()
    path.write_text(json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records) + "\n")

    vqa = load_llava(path)
    assert len(vqa.samples) == 2 and vqa.samples[0].path == tmp_path / "img/a.png"
    a = vqa.samples[0].truth
    assert (a.width, a.height) == (40, 30)
    assert [(qa.question, qa.answer) for qa in a.vqa] == [
        ("What colour is the car?", "Red."),  # the first answer to a repeated question wins
        ("How many people are there?", "2"),
    ]
    task = VQATask()
    outputs = [task.parse_text(task.target_text(a, q)).model_copy(update={"item": q}) for q in task.items(a)]
    assert task.evaluate(outputs, [a] * len(outputs)) == {"exact_match": 100.0}

    captions = load_llava(path, kind="caption")
    assert [s.truth.caption for s in captions.samples] == ["Red.", "A bus on a road."]
    assert captions.samples[1].truth.vqa == [] and captions.samples[1].rgb().shape == (20, 60, 3)
    assert CaptioningTask().target_text(captions.samples[1].truth) == "A bus on a road."


def test_llava_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    cases = [
        ([{"image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}],
         ValueError, "alternate"),
        ([{"image": "a.png", "conversations": [{"from": "robot", "value": "x"}]}], ValueError, "from"),
        ([{"image": "a.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}],
         ValueError, "not an image"),
        ([{"image": "zzz.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}],
         FileNotFoundError, "zzz.png"),
        ({"not": "a list"}, ValueError, "list"),
    ]  # fmt: skip
    for records, error, message in cases:
        with pytest.raises(error, match=message):
            load_llava(_write(tmp_path / "c.json", records))
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "conversations": []}\n{oops\n')
    with pytest.raises(ValueError, match="d.jsonl:2"):
        load_llava(tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="kind"):
        load_llava(tmp_path / "d.jsonl", kind="detection")  # type: ignore[arg-type]
