"""Engine page: replicas' health, orchestration mode and merged adapter over time, adapter-pool residency, GPU
memory and batch sizes, from what the engine service publishes."""

from __future__ import annotations

import time

import altair as alt
import pandas as pd
import streamlit as st

from pipeline.dashboard_client import DashboardClient
from pipeline.schema import EngineHealth, EngineTick
from ui import charts, context

TICKS = 900  # newest timeline ticks read (about 15 minutes of one replica)


def replicas_frame(engines: list[EngineHealth], now: float | None = None) -> pd.DataFrame:
    now = time.time() if now is None else now
    return pd.DataFrame.from_records([{
        "engine": h.engine_id, "ready": h.ready, "backend": h.backend, "inflight": h.inflight, "served": h.served,
        "errors": h.errors, "mode": h.detail.get("mode"), "merged adapter": h.detail.get("merged_adapter"),
        "policy": h.detail.get("policy"), "updated (s ago)": round(max(0.0, now - h.updated_at), 1),
    } for h in engines])


def mode_section(ticks: list[EngineTick], timeline: pd.DataFrame) -> None:
    st.subheader("Orchestration mode and merged adapter")
    if (timeline["mode"] == "unknown").all():
        st.info("This engine reports no orchestration mode (the `hf` backend has no orchestrator); "
                "the chart fills in once the engine does.")
        return
    chart = alt.Chart(timeline).mark_tick(thickness=3, size=24).encode(
        x=alt.X("time:T", title="time"), y=alt.Y("mode:N", title="mode"),
        color=alt.Color("merged adapter:N", title="merged adapter"), tooltip=["time:T", "mode", "merged adapter"])
    st.altair_chart(chart, width="stretch")
    with st.expander("Mode changes"):
        st.dataframe(charts.mode_segments(ticks), hide_index=True, width="stretch")


def batch_section(timeline: pd.DataFrame) -> None:
    st.subheader("Batch size and queue")
    columns = [c for c in ("batch size", "waiting", "inflight") if timeline[c].notna().any()]
    st.line_chart(timeline.set_index("time")[columns])
    if "batch size" not in columns:
        st.caption("The backend reports no running batch; 'inflight' counts requests handed to it.")


def pool_section(ticks: list[EngineTick]) -> None:
    st.subheader("Adapter-pool residency")
    if all(t.adapters_resident is None for t in ticks):
        st.info("This engine reports no adapter pool.")
        return
    resident = charts.residency(ticks)
    if resident.empty:
        st.info("No adapter has been loaded yet.")
        return
    chart = alt.Chart(resident).mark_tick(thickness=2, size=18).encode(
        x=alt.X("time:T", title="time"), y=alt.Y("adapter:N", title="adapter"), tooltip=["time:T", "adapter"])
    st.altair_chart(chart, width="stretch")
    latest = next((t for t in reversed(ticks) if t.adapters_resident is not None), None)
    if latest is not None:
        st.caption("Resident now: " + (", ".join(latest.adapters_resident) or "none"))


def memory_section(timeline: pd.DataFrame) -> None:
    st.subheader("GPU memory")
    if timeline["GPU memory (MiB)"].isna().all():
        st.info("Not reported: this engine runs without CUDA.")
        return
    st.line_chart(timeline.set_index("time")[["GPU memory (MiB)"]])


@st.fragment(run_every=context.REFRESH_S)
def engine_view(client: DashboardClient) -> None:
    with context.redis_errors():
        engines = client.engines()
        ticks = client.engine_ticks(TICKS)
        if not engines and not ticks:
            st.info("No engine replica is reporting: is `valora engine serve` (or `valora demo`) running?")
            return
        st.subheader("Replicas")
        if engines:
            st.dataframe(replicas_frame(engines), hide_index=True, width="stretch")
        else:
            st.warning("No replica has reported health in the last few seconds; the timeline below is history.")
        if not ticks:
            return
        ids = sorted({t.engine_id for t in ticks})
        engine_id = st.selectbox("Replica", ids, key="engine-replica") if len(ids) > 1 else ids[0]
        mine = [t for t in ticks if t.engine_id == engine_id]
        timeline = charts.engine_timeline(mine)
        mode_section(mine, timeline)
        batch_section(timeline)
        pool_section(mine)
        memory_section(timeline)


def render() -> None:
    client = context.client(context.load())
    st.title("Engine")
    engine_view(client)


render()
