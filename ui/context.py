"""What every page needs: the settings and the Redis-backed dashboard client (one connection per process)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import streamlit as st

from pipeline.config import Settings, load_settings
from pipeline.dashboard_client import DashboardClient
from pipeline.transport import REDIS_DOWN, Transport

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REFRESH_S = 2.0  # how often live parts of a page redraw


@dataclass(frozen=True)
class Context:
    settings: Settings
    redis_url: str


def config_file(argv: list[str] | None = None) -> str | None:
    """The ``--config`` path `valora ui` passes to the app (after streamlit's ``--``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.config


def load() -> Context:
    """Settings from the environment (and the config file `valora ui` was given)."""
    settings = load_settings(config_file())
    return Context(settings, settings.redis.url or DEFAULT_REDIS_URL)


@st.cache_resource(show_spinner=False)
def _transport(url: str, connect_timeout_s: float) -> Transport:
    return Transport.connect(url, connect_timeout_s)


def client(ctx: Context) -> DashboardClient:
    """The dashboard client on the configured Redis; a page that cannot reach Redis says so and stops."""
    try:
        transport = _transport(ctx.redis_url, ctx.settings.redis.connect_timeout_s)
    except ConnectionError as exc:
        st.error(f"{exc}. Start Redis (or set REDIS_URL) and reload this page.")
        st.stop()
    return DashboardClient(transport, ctx.settings.ingest.media_dir)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Show a lost Redis connection as a message on the page instead of a traceback."""
    try:
        yield
    except REDIS_DOWN as exc:
        st.error(f"Redis is not answering ({exc}); the page retries on its next refresh.")


FLASH_KEY = "valora_flash"


def flash(message: str) -> None:
    """Show ``message`` as a success note after a rerun (which refreshes every part of the page)."""
    st.session_state[FLASH_KEY] = message
    st.rerun()


def show_flash() -> None:
    message = st.session_state.pop(FLASH_KEY, None)
    if message:
        st.success(message)
