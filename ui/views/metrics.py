"""Metrics page: latency percentiles per task and stage, throughput and dropped frames, accuracy over time, and
requests per adapter."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from pipeline.dashboard_client import DashboardClient
from ui import charts, context

RESULT_WINDOW = 500  # newest results per stream the charts are drawn from


def time_chart(frame: pd.DataFrame, title: str, domain: tuple[float, float] | None = None) -> alt.Chart:
    """Lines with points (a single sample still shows) of every column of a time-indexed frame."""
    long = frame.reset_index().melt(id_vars="time", var_name="task", value_name=title).dropna()
    scale = alt.Scale(domain=list(domain)) if domain else alt.Undefined
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("time:T", title="time"), y=alt.Y(f"{title}:Q", title=title, scale=scale),
        color=alt.Color("task:N", title="task"), tooltip=["time:T", "task", f"{title}:Q"])


def latency_section(summary, results) -> None:
    st.subheader("Latency per task (frame to result)")
    table = charts.task_table(summary)
    st.dataframe(table, hide_index=True, width="stretch")
    if table[["p50 ms", "p95 ms", "p99 ms"]].notna().any().any():
        long = table.melt(id_vars="task", value_vars=["p50 ms", "p95 ms", "p99 ms"], var_name="percentile",
                          value_name="ms").dropna()
        st.bar_chart(long, x="task", y="ms", color="percentile", stack=False)
    st.subheader("Latency per stage")
    stages = charts.stage_percentiles(results)
    if stages.empty:
        st.caption("No results in the window yet.")
        return
    st.bar_chart(stages, x="stage", y="p95", color="task", stack=False)
    with st.expander("p50 / p95 / p99 per task and stage (ms)"):
        st.dataframe(stages, hide_index=True, width="stretch")


def throughput_section(client: DashboardClient, results, streams: list[str]) -> None:
    st.subheader("Throughput and dropped frames")
    left, right = st.columns(2)
    rate = charts.throughput(results)
    with left:
        st.caption("Results per second, by task")
        if rate.empty:
            st.info("No results in the window yet.")
        else:
            st.altair_chart(time_chart(rate, "results/s"), width="stretch")
    dropped = charts.dropped_table(client.dropped_by_reason(streams))
    with right:
        st.caption("Frames skipped by workers, by task and reason")
        if dropped.empty:
            st.success("No frame was dropped.")
        else:
            st.bar_chart(dropped)


def accuracy_section(results) -> None:
    st.subheader("Accuracy against ground truth over time")
    accuracy = charts.accuracy_over_time(results)
    if accuracy.empty:
        st.info("No scored results: accuracy needs frames that carry ground truth (synthetic clips).")
    else:
        st.caption("Rolling mean of the last 10 scored results per task (0-100, each task's primary metric).")
        st.altair_chart(time_chart(accuracy, "accuracy", domain=(0, 100)), width="stretch")


def adapter_section(summary) -> None:
    st.subheader("Requests per adapter")
    adapters = charts.adapter_requests(summary)
    if adapters.empty:
        st.info("No requests yet.")
    else:
        st.bar_chart(adapters)


@st.fragment(run_every=5 * context.REFRESH_S)
def metrics_view(client: DashboardClient, streams: list[str], all_streams: bool) -> None:
    with context.redis_errors():
        summary = client.summary(streams) if all_streams else client.reader.compute(streams)
        results = client.recent_results(streams, RESULT_WINDOW)
        totals = st.columns(4)
        totals[0].metric("Results in window", summary.window_results)
        totals[1].metric("Requests", sum(s.requests for s in summary.tasks.values()))
        totals[2].metric("Errors", sum(s.errors for s in summary.tasks.values()))
        totals[3].metric("Dropped frames", sum(s.dropped for s in summary.tasks.values()))
        latency_section(summary, results)
        throughput_section(client, results, streams)
        accuracy_section(results)
        adapter_section(summary)


def render() -> None:
    ctx = context.load()
    client = context.client(ctx)
    st.title("Metrics")
    ids: list[str] = []
    with context.redis_errors():
        stored = client.reader.summary()
        ids = sorted(set(client.stream_ids()) | set(stored.streams if stored else []))
    if not ids:
        st.info("No stream is registered and no metrics were published yet: add a stream on the Streams page.")
        return
    chosen = st.multiselect("Streams", ids, default=ids, key="metrics-streams")
    if not chosen:
        st.info("Choose at least one stream.")
        return
    metrics_view(client, chosen, set(chosen) == set(ids))


render()
