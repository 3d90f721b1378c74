"""Sign-in: the password whose hash is settings.ui.password_hash guards every page of the dashboard."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import deque

import streamlit as st

from pipeline.config import Settings
from ui import context
from ui.auth import NO_PASSWORD, PasswordHash, verify_password

logger = logging.getLogger(__name__)

SESSION_KEY = "valora_signed_in"
MAX_FAILURES = 10  # failed sign-ins per window, over all sessions, before sign-in pauses
WINDOW_S = 60.0


class LoginThrottle:
    """Failed sign-ins of the whole process in a sliding window; past ``max_failures`` sign-in waits it out."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.failures: deque[float] = deque()
        self.lock = threading.Lock()

    def blocked_for(self, now: float | None = None) -> float:
        """Seconds until sign-in is allowed again (0 when it is allowed now)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            while self.failures and now - self.failures[0] >= self.window_s:
                self.failures.popleft()
            if len(self.failures) < self.max_failures:
                return 0.0
            return self.window_s - (now - self.failures[0])

    def fail(self, now: float | None = None) -> None:
        with self.lock:
            self.failures.append(time.monotonic() if now is None else now)


@st.cache_resource(show_spinner=False)
def _throttle() -> LoginThrottle:
    return LoginThrottle()


def _fingerprint(stored: str) -> str:
    return hashlib.sha256(stored.encode("utf-8")).hexdigest()


def signed_in(settings: Settings) -> bool:
    """Whether this session signed in against the password configured now (a changed password signs it out)."""
    stored = settings.ui.password_hash
    mark = st.session_state.get(SESSION_KEY)
    return bool(stored and isinstance(mark, str) and hmac.compare_digest(mark, _fingerprint(stored)))


def sign_in_page() -> None:
    """The only page a session sees until it signs in."""
    settings = context.load().settings
    st.title("VaLoRA operator console")
    stored = settings.ui.password_hash
    if not stored:
        st.error(NO_PASSWORD)
        return
    try:
        PasswordHash.parse(stored)
    except ValueError as exc:
        st.error(f"settings.ui.password_hash: {exc}")
        return
    with st.form("sign-in"):
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if not submitted:
        return
    throttle = _throttle()
    wait = throttle.blocked_for()
    if wait > 0:
        st.error(f"Too many failed sign-ins; try again in {wait:.0f} s.")
        return
    if verify_password(password, stored):
        st.session_state[SESSION_KEY] = _fingerprint(stored)
        st.rerun()
    throttle.fail()
    logger.warning("failed dashboard sign-in")
    st.error("Wrong password.")


def sign_out_button() -> None:
    if st.sidebar.button("Sign out"):
        st.session_state.pop(SESSION_KEY, None)
        st.rerun()
