"""The synthetic traffic generator: valid, self-consistent and deterministic ground truth, and a decodable MP4."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import numpy as np
import pytest

from apps.datasets.painter import draw_background, render
from apps.datasets.scene import SHAPES, Agent, Scene
from apps.datasets.splits import SynthDataset, iter_samples, iter_truths
from apps.datasets.synth import clip_frames, parse_size, read_truth, sidecar_path, write_clip
from apps.datasets.video import read_frames
from apps.datasets.vocab import CLASSES, COLOR_NAMES, VQA_ANSWERS
from tests.apps.refexpr import answer, resolve


@pytest.fixture(scope="module")
def truths():
    """Truths of 300 training stills plus every frame of a 6 s clip: a wide spread of scenes."""
    stills = list(iter_truths("train", 300, seed=7))
    clip = [truth for _, truth in clip_frames(6, seed=11)]
    return stills + clip


def test_boxes_lie_inside_the_frame_and_are_not_degenerate(truths):
    for truth in truths:
        for obj in truth.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= truth.width and 0 <= y1 < y2 <= truth.height, (truth.frame, obj)
            assert x2 - x1 >= 3 and y2 - y1 >= 3


def test_counts_equal_the_boxes_per_class_for_every_class(truths):
    for truth in truths:
        assert list(truth.counts) == list(CLASSES)
        assert truth.counts == {cls: sum(o.cls == cls for o in truth.objects) for cls in CLASSES}


def test_frames_hold_zero_to_eight_objects_of_known_classes_and_colours(truths):
    sizes = Counter(len(t.objects) for t in truths)
    assert set(sizes) <= set(range(9))
    assert sizes[0] > 0 and sum(sizes[k] for k in range(5, 9)) > 0, sizes
    for truth in truths:
        assert len({o.track_id for o in truth.objects}) == len(truth.objects)
        assert all(o.cls in CLASSES and o.color in COLOR_NAMES for o in truth.objects)


def test_every_referring_expression_picks_out_exactly_its_object(truths):
    kinds = Counter()
    for truth in truths:
        for ref in truth.refs:
            matches = resolve(ref.expr, truth.objects, truth.width)
            assert [o.track_id for o in matches] == [ref.track_id], (truth.frame, ref.expr, truth.objects)
            assert ref.box == matches[0].box
            kinds[
                ref.expr.split()[1] if ref.expr.split()[1] in ("leftmost", "rightmost") else len(ref.expr.split())
            ] += 1
        assert len({r.track_id for r in truth.refs}) == len(truth.refs)
    assert kinds["leftmost"] and kinds["rightmost"] and kinds[2] and kinds[3] and kinds[4], kinds


def test_vqa_answers_follow_from_the_objects(truths):
    kinds = Counter()
    for truth in truths:
        assert 2 <= len(truth.vqa) <= 4
        for qa in truth.vqa:
            assert qa.answer == answer(qa.question, truth.objects, truth.width), (qa, truth.objects)
            assert qa.answer in VQA_ANSWERS
            kinds[qa.question.split()[0] + qa.question.split()[1]] += 1
    assert set(kinds) == {"isthere", "howmany", "whatcolor", "whatis"}, kinds
    answers = Counter(qa.answer for t in truths for qa in t.vqa if qa.question.startswith("is there"))
    assert answers["yes"] > 50 and answers["no"] > 50


def test_caption_names_every_object_once(truths):
    for truth in truths:
        if not truth.objects:
            assert truth.caption == "nothing on the street"
            continue
        assert truth.caption.endswith(" on the street")
        for cls in CLASSES:
            mentioned = truth.caption.count(f" {cls}") + truth.caption.count(f" {'people' if cls == 'person' else cls}")
            assert (mentioned > 0) == (truth.counts[cls] > 0), truth.caption


def _hash(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def test_stills_are_deterministic_by_seed_and_splits_are_disjoint():
    first = [(_hash(img), truth) for img, truth in iter_samples("val", 6, seed=3)]
    again = [(_hash(img), truth) for img, truth in iter_samples("val", 6, seed=3)]
    assert first == again
    other_seed = [truth for _, truth in iter_samples("val", 6, seed=4)]
    assert [t for _, t in first] != other_seed
    # Scenes are told apart by their objects; empty streets look alike in every split.
    by_split = {
        split: {json.dumps([o.model_dump() for o in t.objects]) for t in iter_truths(split, 200) if t.objects}
        for split in ("train", "val", "test")
    }
    assert min(len(scenes) for scenes in by_split.values()) > 150
    assert not by_split["train"] & by_split["val"] and not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    # The truth does not depend on whether the picture is drawn.
    dataset = SynthDataset("test", 5, seed=1)
    assert [dataset[i].truth for i in range(5)] == [dataset.truth(i) for i in range(5)]


def test_clip_mp4_decodes_to_the_right_frames_and_matches_its_sidecar(tmp_path):
    video, sidecar = write_clip(tmp_path, seconds=3, seed=5, fps=8, size=(160, 128))
    assert sidecar == sidecar_path(video)
    frames = list(read_frames(video))
    assert len(frames) == 24 and all(f.shape == (128, 160, 3) for f in frames)
    lines = sidecar.read_text().splitlines()
    assert len(lines) == 24 and [json.loads(line)["frame"] for line in lines] == list(range(24))
    truths = read_truth(sidecar)
    assert [t.t for t in truths] == pytest.approx([i / 8 for i in range(24)])
    assert all((t.width, t.height) == (160, 128) for t in truths)
    # H.264 is lossy, but each decoded frame stays close to what was drawn.
    drawn = [rgb for rgb, _ in clip_frames(3, seed=5, fps=8, size=(160, 128))]
    for decoded, original in zip(frames, drawn, strict=True):
        assert np.abs(decoded.astype(int) - original.astype(int)).mean() < 4.0


def test_same_seed_gives_identical_clips_and_another_seed_differs(tmp_path):
    def clip(seed: int, folder: str):
        # Unrelated allocations between clips: an encoder that reads uninitialised memory shows up here.
        clutter = [os.urandom(size) for size in range(1000, 3_000_000, 150_000)]
        video, sidecar = write_clip(tmp_path / folder, seconds=2, seed=seed)
        del clutter
        return [_hash(f) for f in read_frames(video)], sidecar.read_text()

    first, again, other = clip(21, "a"), clip(21, "b"), clip(22, "c")
    assert clip(21, "d") == first
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("direction", [1, -1])
def test_drawn_silhouette_fills_its_box(cls, direction):
    """The pixels an agent changes span its ground-truth box: boxes are tight around what is drawn."""
    scene = Scene(np.random.default_rng(0), 224, 224, max_objects=0)
    background = draw_background(scene, np.random.default_rng(1))
    h = SHAPES[cls][0] * 1.1
    lane = 2 if cls != "person" else 5
    scene.agents = [Agent(1, cls, "red", lane, 60.3, h * SHAPES[cls][1], h, direction)]
    (box,) = [o.box for o in scene.visible_objects()]
    # Anti-aliased edges blend into the background over about one pixel; count clearly changed pixels.
    changed = np.argwhere(np.abs(render(scene, background).astype(int) - background).sum(axis=2) > 30)
    y1, x1 = changed.min(axis=0)
    y2, x2 = changed.max(axis=0) + 1
    assert abs(x1 - box[0]) <= 1.5 and abs(x2 - box[2]) <= 1.5
    assert abs(y2 - box[3]) <= 1.5 and abs(y1 - box[1]) <= 1.5


def test_partly_visible_objects_are_clipped_and_hidden_ones_left_out():
    scene = Scene(np.random.default_rng(0), 224, 224, max_objects=0)
    w, h = 50.0, 22.0
    scene.agents = [
        Agent(1, "car", "blue", 1, -20.0, w, h, 1),  # 60 % inside: kept, clipped at x = 0
        Agent(2, "car", "blue", 2, 200.0, w, h, -1),  # 48 % inside: kept, clipped at x = 224
        Agent(3, "car", "blue", 3, -35.0, w, h, 1),  # 30 % inside: left out
    ]
    objects = scene.visible_objects()
    assert [o.track_id for o in objects] == [1, 2]
    assert objects[0].box[0] == 0.0 and objects[1].box[2] == 224.0


@pytest.mark.parametrize("bad", ["33", "0", "100x", "axb", (64, 63), "5000x64"])
def test_bad_sizes_are_rejected_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_bad_clip_arguments_fail_before_writing(tmp_path):
    for kwargs in ({"fps": 0}, {"fps": 500}, {"seconds": 0}, {"seed": -1}):
        args = {"seconds": 1, "seed": 1, **kwargs}
        with pytest.raises(ValueError):
            write_clip(tmp_path / "never", **args)
    assert not (tmp_path / "never").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        write_clip(tmp_path / "file", seconds=1, seed=1)


def test_read_truth_reports_missing_and_malformed_sidecars(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_truth(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"frame": 0, "width": 10, "height": 10}\n{"frame": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_truth(bad)
