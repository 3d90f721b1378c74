"""Metric implementations against reference implementations and reference values."""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest

from apps.tasks.metrics.ap import mean_ap
from apps.tasks.metrics.bleu import corpus_bleu
from apps.tasks.metrics.boxes import from_grid, iou, to_grid
from apps.tasks.metrics.cider import CiderD, cider_d
from apps.tasks.metrics.text import normalise_answer, tokenize

CLASSES = ["car", "bus", "person"]


def _random_detection_set(rng: random.Random, images: int, tie_scores: bool):
    """Ground truth per image and detections that jitter, miss, duplicate and hallucinate objects."""
    truths, dets = [], []
    for _ in range(images):
        gts = []
        for _ in range(rng.randint(0, 6)):
            x, y = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
            gts.append((rng.choice(CLASSES), [x, y, x + rng.uniform(0.03, 0.2), y + rng.uniform(0.03, 0.2)]))
        found = []
        for cls, (x1, y1, x2, y2) in gts:
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                # Jitter each side by up to 35 % of the box's extent along its axis: boxes stay ordered.
                jx, jy = rng.uniform(0.0, 0.35) * (x2 - x1), rng.uniform(0.0, 0.35) * (y2 - y1)
                dx1, dx2, dy1, dy2 = (rng.uniform(-j, j) for j in (jx, jx, jy, jy))
                box = [x1 + dx1, y1 + dy1, x2 + dx2, y2 + dy2]
                found.append(
                    (cls if rng.random() < 0.9 else rng.choice(CLASSES), box, 1.0 if tie_scores else rng.random())
                )
        for _ in range(rng.randint(0, 2)):
            x, y = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
            found.append((rng.choice(CLASSES), [x, y, x + 0.1, y + 0.1], 1.0 if tie_scores else rng.random()))
        truths.append(gts)
        dets.append(found)
    return dets, truths


def _pycocotools_ap(dets, truths) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {c: i + 1 for i, c in enumerate(CLASSES)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    gt_json = {
        "images": [{"id": i + 1, "width": 1, "height": 1} for i in range(len(truths))],
        "categories": [{"id": v, "name": k} for k, v in cat.items()],
        "annotations": [
            {"id": len(truths) * 100 + i * 10 + k, "image_id": i + 1, "category_id": cat[c], "bbox": xywh(b),
             "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
            for i, gts in enumerate(truths) for k, (c, b) in enumerate(gts)
        ],
    }  # fmt: skip
    results = [
        {"image_id": i + 1, "category_id": cat[c], "bbox": xywh(b), "score": s}
        for i, found in enumerate(dets)
        for c, b, s in found
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt_json
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return 100 * evaluator.stats[1], 100 * evaluator.stats[0]


@pytest.mark.parametrize("seed", range(8))
def test_map_matches_pycocotools(seed):
    pytest.importorskip("pycocotools")
    rng = random.Random(seed)
    dets, truths = _random_detection_set(rng, images=rng.randint(1, 12), tie_scores=seed % 4 == 3)
    if not any(truths) or not any(dets):
        truths[0].append(("car", [0.1, 0.1, 0.3, 0.3]))
        dets[0].append(("car", [0.12, 0.1, 0.3, 0.31], 0.5))
    ap50, ap = _pycocotools_ap(dets, truths)
    assert mean_ap(dets, truths, (0.5,)) == pytest.approx(ap50, abs=1e-9)
    assert mean_ap(dets, truths) == pytest.approx(ap, abs=1e-9)


def test_map_hand_computed_example():
    # One class, two objects; detections in score order: hit, false positive, hit.
    # Precision at recall 0.5 is 1, at recall 1 it is 2/3 -> 51 points at 1.0, 50 points at 2/3.
    truths = [[("car", [0, 0, 10, 10]), ("car", [20, 20, 30, 30])]]
    dets = [[("car", [0, 0, 10, 10], 0.9), ("car", [50, 50, 60, 60], 0.8), ("car", [20, 20, 30, 30], 0.7)]]
    assert mean_ap(dets, truths, (0.5,)) == pytest.approx(100 * (51 * 1.0 + 50 * 2 / 3) / 101)
    assert mean_ap([[]], truths) == 0.0
    assert mean_ap([[]], [[]]) == 100.0 and mean_ap([[("car", [0, 0, 1, 1], 1.0)]], [[]]) == 0.0


def test_iou_and_grid():
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou([0, 0, 1, 1], [1, 1, 2, 2]) == 0.0 and iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert to_grid([0, 0, 224, 224], 224, 224) == [0, 0, 100, 100]
    assert to_grid([223.9, 10, 224, 10.1], 224, 224) == [99, 4, 100, 5]  # never collapses to an empty box
    assert from_grid([0, 50, 100, 25]) == [0.0, 0.5, 1.0, 0.25]


def _random_corpus(rng: random.Random, size: int):
    words = ["a", "the", "red", "blue", "car", "cars", "bus", "on", "street", "two", "people", "in", "person", "road"]
    sentence = lambda shortest: [rng.choice(words) for _ in range(rng.randint(shortest, 14))]
    # Candidates have 4+ words: NLTK counts a phantom n-gram for shorter ones (max(1, count)), the standard
    # definition (Papineni; sacrebleu; coco-caption) does not; test_bleu4_textbook_cases covers short ones.
    candidates = [sentence(4) for _ in range(size)]
    return candidates, [[sentence(0) for _ in range(rng.randint(1, 4))] for _ in range(size)]


@pytest.mark.parametrize("seed", range(20))
def test_bleu4_matches_nltk_corpus_bleu(seed):
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    rng = random.Random(seed)
    candidates, references = _random_corpus(rng, rng.randint(1, 30))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = nltk_bleu.corpus_bleu(references, candidates)
    assert corpus_bleu(candidates, references) == pytest.approx(expected, abs=1e-12)


def test_bleu4_textbook_cases():
    ref = ["the", "cat", "is", "on", "the", "mat"]
    assert corpus_bleu([ref], [[ref]]) == pytest.approx(1.0)
    # Brevity penalty: a 4-word exact prefix of a 6-word reference has all precisions 1, BP = exp(1 - 6/4).
    assert corpus_bleu([ref[:4]], [[ref]]) == pytest.approx(np.exp(1 - 6 / 4))
    assert corpus_bleu([[]], [[ref]]) == 0.0 and corpus_bleu([["dog"] * 6], [[ref]]) == 0.0
    # A 2-word candidate adds nothing to the 3- and 4-gram totals: pooled precisions 7/8, 5/6, 4/4, 3/3, BP 1.
    long = ["a", "red", "car", "on", "the", "street"]
    expected = np.exp(np.mean(np.log([7 / 8, 5 / 6, 1.0, 1.0])))
    assert corpus_bleu([long, ["a", "bus"]], [[long], [["a", "car"]]]) == pytest.approx(expected)


# Values computed by the coco-caption reference implementation (pycocoevalcap 1.2, CiderScorer(n=4, sigma=6))
# on these exact, already tokenised corpora.
CIDER_REFERENCE = {
    "traffic": (
        [
            "two red cars and a person in blue on the street",
            "a bus on the street",
            "nothing on the street",
            "a white truck and two people in black on the street",
        ],
        [
            ["two red cars and a person in blue on the street"],
            ["a yellow bus on the street"],
            ["nothing on the street"],
            ["a white truck and a person in black on the street"],
        ],
        7.729653982708891,
        [10.0, 4.781292474561466, 10.0, 6.137323456274095],
    ),
    "multi_ref": (
        ["a man is riding a horse", "a dog runs on the beach", "two cats sleep"],
        [
            ["a man rides a horse", "a person riding a brown horse", "man on horseback"],
            ["a dog is running on the beach", "the dog runs along the sand"],
            ["two cats are sleeping on a sofa", "cats asleep"],
        ],
        1.968720467397785,
        [1.6853682891769697, 2.9117064082158857, 1.3090867048004995],
    ),
}


@pytest.mark.parametrize("name", CIDER_REFERENCE)
def test_cider_d_matches_the_coco_caption_reference_values(name):
    candidates, references, corpus_score, per_image = CIDER_REFERENCE[name]
    cands = [c.split() for c in candidates]
    refs = [[r.split() for r in rs] for rs in references]
    assert cider_d(cands, refs) == pytest.approx(corpus_score, abs=1e-12)
    scorer = CiderD(refs)
    assert [scorer.score(c, r) for c, r in zip(cands, refs, strict=True)] == pytest.approx(per_image, abs=1e-12)


def test_cider_d_clipping_and_length_penalty():
    refs = [[["a", "red", "car", "on", "the", "street"]], [["two", "buses", "on", "the", "road"]]]
    scorer = CiderD(refs)
    assert scorer.score(refs[0][0], refs[0]) == pytest.approx(10.0)
    # Repeating the candidate doubles its term frequencies; clipping keeps it from gaining, the length penalty
    # (6 extra words, sigma 6) takes exp(-1/2) of what is left.
    repeated = scorer.score(refs[0][0] * 2, refs[0])
    assert 0 < repeated < 10.0 * np.exp(-0.5)
    assert scorer.score(["zebra"], refs[0]) == 0.0
    with pytest.raises(ValueError):
        cider_d([], [])


def test_text_normalisation():
    assert tokenize("Two RED cars, and a person-in-blue!") == ["two", "red", "cars", "and", "a", "person", "in", "blue"]
    assert normalise_answer(" Two. ") == "2" and normalise_answer("The Red") == "red"
    assert normalise_answer("yes!") == "yes" and normalise_answer("") == ""
