"""Streams page: every registered source with its health; register, edit and remove RTSP, file and webcam sources."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from pipeline.dashboard_client import DashboardClient, StreamRow
from pipeline.registry import SpecError
from pipeline.schema import StreamSpec, known_task_names
from ui import context
from ui.forms import spec_fields, task_map

URL_HELP = ("rtsp:// or rtsps:// camera, http(s):// HLS or progressive stream, /dev/videoN webcam, or a video file "
            "under the media directory ({media_dir}).")


def health_frame(rows: list[StreamRow], now: float | None = None) -> pd.DataFrame:
    """One line per stream: spec, ingest health and the last error (registry or ingest)."""
    now = time.time() if now is None else now
    records = []
    for row in rows:
        spec, health = row.record.spec, row.health
        age = None if health is None or health.last_frame_at is None else max(0.0, now - health.last_frame_at)
        records.append({
            "stream": spec.id, "kind": spec.kind, "url": spec.url, "enabled": spec.enabled,
            "tasks": ", ".join(spec.tasks) or "-",
            "state": health.state if health else "not ingested",
            "fps in": health.fps_in if health else None, "fps out": health.fps_out if health else None,
            "frames": health.frames_published if health else 0,
            "reconnects": health.reconnects if health else 0,
            "last frame age (s)": round(age, 1) if age is not None else None,
            "dropped": sum(row.dropped.values()),
            "last error": row.record.error or (health.last_error if health else None) or "",
        })
    return pd.DataFrame.from_records(records)


@st.fragment(run_every=context.REFRESH_S)
def health_table(client: DashboardClient) -> None:
    with context.redis_errors():
        rows = client.stream_rows()
        if not rows:
            st.info("No stream is registered yet. Register one below.")
            return
        st.dataframe(health_frame(rows), hide_index=True, width="stretch")


def task_checkboxes(key: str, enabled: list[str]) -> list[str]:
    names = known_task_names()
    columns = st.columns(len(names))
    return [name for name, col in zip(names, columns, strict=True)
            if col.checkbox(name, value=name in enabled, key=f"{key}-task-{name}")]


def source_inputs(key: str, media_dir: str, spec: StreamSpec | None = None) -> dict:
    """The source and timing inputs shared by the register and edit forms."""
    url = st.text_input("URL", value=spec.url if spec else "", key=f"{key}-url",
                        placeholder="rtsp://camera.local/stream1", help=URL_HELP.format(media_dir=media_dir))
    left, middle, right = st.columns(3)
    fps = left.number_input("Publish fps", min_value=0.1, max_value=60.0, step=0.5, key=f"{key}-fps",
                            value=float(spec.fps) if spec else float(StreamSpec.model_fields["fps"].default))
    slo = middle.number_input("Latency SLO (ms)", min_value=1.0, max_value=600_000.0, step=100.0, key=f"{key}-slo",
                              value=float(spec.latency_slo_ms if spec else StreamSpec.model_fields["latency_slo_ms"]
                                          .default))
    target = right.number_input("Accuracy target (0-100, optional)", min_value=0.0, max_value=100.0, key=f"{key}-acc",
                                value=spec.accuracy_target if spec else None)
    left, right = st.columns(2)
    max_age = left.number_input("Skip frames older than (s, optional)", min_value=0.01, key=f"{key}-age",
                                value=spec.max_frame_age_s if spec else None,
                                help="Latest-wins for live sources (default 5 s); files keep every frame.")
    loop = right.checkbox("Loop (files only)", value=bool(spec and spec.loop), key=f"{key}-loop")
    return {"url": url, "fps": fps, "latency_slo_ms": slo, "accuracy_target": target, "max_frame_age_s": max_age,
            "loop": loop}


def register_form(client: DashboardClient, media_dir: str) -> None:
    with st.form("register", clear_on_submit=False):
        stream_id = st.text_input("Stream id", key="register-id", placeholder="gate-north",
                                  help="Lower-case letters, digits, '-' and '_'.")
        inputs = source_inputs("register", media_dir)
        st.caption("Tasks")
        tasks = task_checkboxes("register", known_task_names())
        submitted = st.form_submit_button("Register stream")
    if not submitted:
        return
    try:
        spec = client.registry.add({"id": stream_id.strip(), **spec_fields(tasks=task_map(tasks), **inputs)})
    except SpecError as exc:
        st.error(str(exc))
        return
    for key in [k for k in st.session_state if str(k).startswith("register-")]:
        del st.session_state[key]  # an empty form for the next stream
    context.flash(f"Registered {spec.id} ({spec.kind}: {spec.url}).")


def edit_form(client: DashboardClient, media_dir: str, specs: list[StreamSpec]) -> None:
    stream_id = st.selectbox("Stream", [s.id for s in specs], key="edit-stream")
    spec = next(s for s in specs if s.id == stream_id)
    with st.form(f"edit-{spec.id}"):
        inputs = source_inputs(f"edit-{spec.id}", media_dir, spec)
        enabled = st.checkbox("Enabled (ingested)", value=spec.enabled, key=f"edit-{spec.id}-enabled")
        st.caption("Tasks (questions and expressions are set on the Live page)")
        tasks = task_checkboxes(f"edit-{spec.id}", list(spec.tasks))
        submitted = st.form_submit_button("Save changes")
    if not submitted:
        return
    try:
        updated = client.registry.update(spec.id, spec_fields(tasks=task_map(tasks, spec.tasks), enabled=enabled,
                                                              **inputs))
    except SpecError as exc:
        st.error(str(exc))
        return
    context.flash(f"Updated {updated.id}.")


def remove_form(client: DashboardClient, specs: list[StreamSpec]) -> None:
    stream_id = st.selectbox("Stream", [s.id for s in specs], key="remove-stream")
    confirm = st.checkbox(f"Yes, stop ingesting and forget {stream_id}", key="remove-confirm")
    if st.button("Remove stream", disabled=not confirm, type="primary"):
        try:
            client.registry.remove(stream_id)
        except KeyError:
            st.warning(f"{stream_id} was already removed.")
            return
        context.flash(f"Removed {stream_id}.")


def render() -> None:
    ctx = context.load()
    client = context.client(ctx)
    media_dir = str(ctx.settings.ingest.media_dir.resolve())
    st.title("Streams")
    context.show_flash()
    health_table(client)
    with context.redis_errors():
        register_tab, edit_tab, remove_tab = st.tabs(["Register", "Edit", "Remove"])
        with register_tab:
            register_form(client, media_dir)
        specs = client.registry.specs()
        with edit_tab:
            if specs:
                edit_form(client, media_dir, specs)
            else:
                st.info("Nothing to edit yet.")
        with remove_tab:
            if specs:
                remove_form(client, specs)
            else:
                st.info("Nothing to remove.")


render()
