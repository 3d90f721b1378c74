"""bench/serving.py's report: the comparison table and a PNG of latency vs skew per policy (drawn with PIL)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BASELINES = ("slora", "dlora", "punica")
COLORS = {"valora": (200, 30, 45), "slora": (40, 90, 200), "dlora": (30, 150, 70), "punica": (150, 90, 200),
          "merged-only": (120, 120, 120)}


def _points(runs: list[dict]) -> dict[tuple[float, float], dict[str, dict]]:
    """(load, skew) -> policy -> run; repeated runs of a point are averaged (``repeats``, ``avg_ms_range``)."""
    grouped: dict[tuple[float, float], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run["load"], run["skew"]][run["policy"]].append(run)
    out: dict[tuple[float, float], dict[str, dict]] = defaultdict(dict)
    for point, by_policy in grouped.items():
        for policy, reps in by_policy.items():
            merged = dict(reps[-1])
            for key in ("avg_ms", "p95_ms", "throughput_rps"):
                merged[key] = sum(r[key] for r in reps) / len(reps)
            merged["unfinished"] = sum(r["unfinished"] for r in reps)
            merged["repeats"] = len(reps)
            merged["avg_ms_range"] = (min(r["avg_ms"] for r in reps), max(r["avg_ms"] for r in reps))
            out[point][policy] = merged
    return out


def comparisons(runs: list[dict]) -> list[dict]:
    """Per (load, skew): valora's average latency against slora, dlora and the best baseline."""
    rows = []
    for (load, skew), by_policy in sorted(_points(runs).items()):
        ours = by_policy.get("valora")
        base = {p: by_policy[p]["avg_ms"] for p in BASELINES if p in by_policy}
        if ours is None or not base:
            continue
        best = min(base, key=base.get)
        rows.append({"load": load, "skew": skew, "valora_avg_ms": ours["avg_ms"],
                     "reduction_vs_slora": 1 - ours["avg_ms"] / base["slora"] if "slora" in base else None,
                     "reduction_vs_dlora": 1 - ours["avg_ms"] / base["dlora"] if "dlora" in base else None,
                     "best_baseline": best, "ratio_to_best_baseline": ours["avg_ms"] / base[best]})
    return rows


def _fmt(value, pattern: str = "{:.0f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def table(runs: list[dict], policies: list[str]) -> str:
    """Markdown: average / p95 latency (ms) and throughput per policy, then valora against the baselines.

    Repeated runs of a point show their mean, with the range of the average latency in brackets."""
    head = ["load", "rate req/s", "skew"] + [f"{p} avg / p95 ms (req/s)" for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (load, skew), by_policy in sorted(_points(runs).items()):
        rate = next(iter(by_policy.values()))["rate"]
        cells = [f"{load:.2f}", f"{rate:.1f}", f"{skew:.1f}"]
        for p in policies:
            r = by_policy.get(p)
            spread = "" if r is None or r["repeats"] == 1 else \
                f" [{_fmt(r['avg_ms_range'][0])}-{_fmt(r['avg_ms_range'][1])}]"
            cells.append("-" if r is None else f"{_fmt(r['avg_ms'])}{spread} / {_fmt(r['p95_ms'])} "
                                               f"({r['throughput_rps']:.1f})" + ("*" if r["unfinished"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| load | skew | valora avg-latency cut vs slora | vs dlora | best baseline | valora / best |",
              "|---|---|---|---|---|---|"]
    for c in comparisons(runs):
        lines.append(f"| {c['load']:.2f} | {c['skew']:.1f} | {_fmt(c['reduction_vs_slora'], '{:+.1%}')} | "
                     f"{_fmt(c['reduction_vs_dlora'], '{:+.1%}')} | {c['best_baseline']} | "
                     f"{c['ratio_to_best_baseline']:.3f} |")
    lines.append("\n(* some requests had not finished when the run was cut off; their latency counts up to the cut)")
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def plot(runs: list[dict], policies: list[str], path: Path, title: str) -> None:
    """Average latency (log scale) vs skew, one line per policy, one panel per load."""
    points = _points(runs)
    loads = sorted({load for load, _ in points})
    if not loads:
        return
    width, panel_h, margin = 1000, 420, 70
    img = Image.new("RGB", (width, 50 + panel_h * len(loads)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 12), title, fill="black", font=_font(18))
    values = [r["avg_ms"] for r in runs if r["avg_ms"] > 0 and not math.isnan(r["avg_ms"])]
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    skews = sorted({skew for _, skew in points})
    for k, load in enumerate(loads):
        top = 50 + k * panel_h + 20
        box = (margin, top, width - 180, top + panel_h - 80)
        _axes(draw, box, skews, lo, hi, f"load {load:.2f} of capacity")
        for p in policies:
            xy = [(_x(box, skews, skew), _y(box, lo, hi, points[load, skew][p]["avg_ms"]))
                  for skew in skews if p in points[load, skew] and points[load, skew][p]["avg_ms"] > 0]
            color = COLORS.get(p, (0, 0, 0))
            if len(xy) > 1:
                draw.line(xy, fill=color, width=3)
            for x, y in xy:
                draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=color)
        for i, p in enumerate(policies):
            y = top + 10 + 24 * i
            draw.line((width - 165, y + 8, width - 135, y + 8), fill=COLORS.get(p, (0, 0, 0)), width=4)
            draw.text((width - 128, y), p, fill="black", font=_font(15))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _x(box, skews: list[float], skew: float) -> float:
    left, _, right, _ = box
    span = (skews[-1] - skews[0]) or 1.0
    return left + 30 + (right - left - 60) * (skew - skews[0]) / span


def _y(box, lo: int, hi: int, value: float) -> float:
    _, top, _, bottom = box
    return bottom - (bottom - top) * (math.log10(value) - lo) / (hi - lo)


def _axes(draw: ImageDraw.ImageDraw, box, skews: list[float], lo: int, hi: int, label: str) -> None:
    left, top, right, bottom = box
    font = _font(13)
    draw.rectangle(box, outline="black")
    for decade in range(lo, hi + 1):
        for m in (1, 2, 5):
            value = m * 10 ** decade
            if not 10 ** lo <= value <= 10 ** hi:
                continue
            y = _y(box, lo, hi, value)
            draw.line((left, y, right, y), fill=(225, 225, 225) if m > 1 else (190, 190, 190))
            draw.text((left - 60, y - 7), f"{value:g}", fill="black", font=font)
    for skew in skews:
        x = _x(box, skews, skew)
        draw.line((x, top, x, bottom), fill=(235, 235, 235))
        draw.text((x - 10, bottom + 6), f"{skew:.1f}", fill="black", font=font)
    draw.text(((left + right) / 2 - 120, bottom + 26), "hottest adapter's share (skew)", fill="black", font=font)
    draw.text((left + 8, top + 6), f"average latency, ms (log) - {label}", fill="black", font=font)
