"""Live page: a stream's newest processed frame with its overlays; the operator picks tasks and asks questions."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from apps.tasks import load_output
from apps.tasks.output import CaptionOutput, CountingOutput, DetectionOutput, GroundingOutput, VQAOutput
from pipeline.dashboard_client import DashboardClient, ProcessedFrame
from pipeline.frames import decode_jpeg
from pipeline.registry import SpecError
from pipeline.schema import FrameEntry, StreamSpec, TaskResult, known_task_names
from ui import context, overlay
from ui.forms import items_of, lines, task_map, with_items

FRAME_CHOICES = 30  # processed frames offered when not following the newest


def answers_frame(results: dict[str, TaskResult]) -> pd.DataFrame:
    """One line per output: the task, what it was asked, and its answer as text."""
    rows = []
    for task in sorted(results):
        result = results[task]
        for data in result.outputs:
            output = load_output(data)
            if isinstance(output, DetectionOutput):
                answer = "; ".join(f"{d.cls} {_fmt_box(d.box)}" for d in output.detections) or "no objects"
            elif isinstance(output, GroundingOutput):
                answer = _fmt_box(output.box) if output.box is not None else "no box"
            elif isinstance(output, CountingOutput):
                answer = ", ".join(f"{cls} {n}" for cls, n in sorted(output.counts.items())) or "no counts"
            elif isinstance(output, CaptionOutput):
                answer = output.caption
            elif isinstance(output, VQAOutput):
                answer = output.answer
            else:
                answer = output.raw
            rows.append({"task": task, "asked": output.item or "", "answer": overlay.printable(answer, 300),
                         "parsed": not output.parse_error})
        if not result.ok:
            rows.append({"task": task, "asked": "", "answer": f"error: {result.error}", "parsed": False})
    return pd.DataFrame.from_records(rows, columns=["task", "asked", "answer", "parsed"])


def tasks_frame(results: dict[str, TaskResult]) -> pd.DataFrame:
    """Per task: live accuracy against ground truth, latency, adapters and inference modes."""
    return pd.DataFrame.from_records([{
        "task": task, "accuracy": r.accuracy, "frame→result ms": round(r.latency.frame_to_result_ms),
        "engine ms": round(r.latency.engine_ms), "requests": r.requests,
        "adapters": ", ".join(sorted({a or "base" for a in r.adapters})), "modes": ", ".join(r.modes),
    } for task, r in sorted(results.items())])


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def frame_label(frame: ProcessedFrame) -> str:
    return f"frame {frame.seq} · {frame.pts:.1f} s · {', '.join(frame.tasks)}"


def task_controls(client: DashboardClient, spec: StreamSpec) -> None:
    """Which tasks run on this stream, and the operator's own VQA questions and grounding expressions."""
    with st.expander("Tasks and questions", expanded=False), st.form(f"tasks-{spec.id}"):
        names = known_task_names()
        columns = st.columns(len(names))
        chosen = [name for name, col in zip(names, columns, strict=True)
                  if col.checkbox(name, value=name in spec.tasks, key=f"live-{spec.id}-task-{name}")]
        questions = st.text_area("VQA questions, one per line (empty: the frame's own questions)",
                                 value="\n".join(items_of(spec.tasks, "vqa")), key=f"live-{spec.id}-questions")
        expressions = st.text_area("Objects to locate, one per line (empty: the frame's own expressions)",
                                   value="\n".join(items_of(spec.tasks, "grounding")),
                                   key=f"live-{spec.id}-expressions")
        submitted = st.form_submit_button("Apply")
    if not submitted:
        return
    tasks = with_items(task_map(chosen, spec.tasks), {"vqa": lines(questions), "grounding": lines(expressions)})
    try:
        client.registry.update(spec.id, {"tasks": tasks})
    except SpecError as exc:
        st.error(str(exc))
        return
    for key in [k for k in st.session_state if str(k).startswith(f"live-{spec.id}-")]:
        del st.session_state[key]  # the form shows the stored spec again, as normalised by the registry
    context.flash(f"Tasks of {spec.id}: {', '.join(tasks) or 'none'}. Workers pick the change up within seconds.")


def pick_frame(client: DashboardClient, frames: list[ProcessedFrame], follow: bool, stream_id: str
               ) -> tuple[ProcessedFrame, FrameEntry] | None:
    """The frame to show (newest, or the operator's choice) with its picture; skips frames already trimmed."""
    if not follow:
        by_key = {f"{f.seq}@{f.frame_ts}": f for f in frames[:FRAME_CHOICES]}
        key = st.selectbox("Frame", list(by_key), format_func=lambda k: frame_label(by_key[k]),
                           key=f"live-{stream_id}-frame")
        chosen = by_key.get(key) if key is not None else None
        entry = client.frame_entry(chosen) if chosen is not None else None
        return (chosen, entry) if entry is not None else None
    for frame in frames[:FRAME_CHOICES]:
        entry = client.frame_entry(frame)
        if entry is not None:
            return frame, entry
    return None


@st.fragment(run_every=context.REFRESH_S)
def live_view(client: DashboardClient, stream_id: str) -> None:
    with context.redis_errors():
        follow = st.toggle("Follow the newest frame", value=True, key=f"live-{stream_id}-follow")
        frames = client.processed_frames(stream_id)
        shown = pick_frame(client, frames, follow, stream_id) if frames else None
        if shown is None:
            waiting(client, stream_id, bool(frames))
            return
        frame, entry = shown
        notes = overlay.annotations(frame.results)
        picture, side = st.columns([3, 2])
        picture.image(overlay.render(decode_jpeg(entry.jpeg), frame.results),
                      caption=f"{stream_id} · frame {frame.seq} · {frame.pts:.1f} s into the source · "
                              f"{len(notes.marks)} boxes · {max(0.0, time.time() - frame.frame_ts):.0f} s ago",
                      width="stretch", output_format="PNG")  # PNG: boxes and labels stay crisp and exact
        with side:
            if notes.counts:
                st.markdown(" ".join(f":blue-badge[{cls} {n}]" for cls, n in sorted(notes.counts.items())))
            st.dataframe(answers_frame(frame.results), hide_index=True, width="stretch",
                         column_config={"answer": st.column_config.TextColumn(width="large")})
            st.dataframe(tasks_frame(frame.results), hide_index=True, width="stretch")


def waiting(client: DashboardClient, stream_id: str, had_results: bool) -> None:
    """No processed frame to show: the newest published frame, if any, and why there is nothing more."""
    latest = client.latest_frame(stream_id)
    if had_results:
        st.info("The frames these results were computed for are no longer retained; waiting for newer results.")
    elif latest is None:
        st.info("No frames yet: is the ingestor running (`valora ingest`), and is the stream enabled?")
    else:
        st.info("Frames are arriving; waiting for the first task results (are workers running?).")
    if latest is not None:
        st.image(decode_jpeg(latest.jpeg), caption=f"{stream_id} · newest frame {latest.seq} (no overlays yet)")


def render() -> None:
    ctx = context.load()
    client = context.client(ctx)
    st.title("Live")
    context.show_flash()
    with context.redis_errors():
        specs = client.registry.specs()
        if not specs:
            st.info("No stream is registered yet: add one on the Streams page.")
            return
        ids = [s.id for s in specs]
        wanted = st.query_params.get("stream")
        stream_id = st.selectbox("Stream", ids, index=ids.index(wanted) if wanted in ids else 0, key="live-stream")
        st.query_params["stream"] = stream_id
        spec = next(s for s in specs if s.id == stream_id)
        task_controls(client, spec)
    live_view(client, stream_id)


render()
