"""The dashboard's entrypoint (`valora ui` runs it): settings, sign-in, then the Streams, Live, Metrics and
Engine pages."""

from __future__ import annotations

import streamlit as st

from ui import context, login

st.set_page_config(page_title="VaLoRA console", page_icon=":material/videocam:", layout="wide")

if login.signed_in(context.load().settings):
    pages = [
        st.Page("views/streams.py", title="Streams", icon=":material/videocam:", default=True),
        st.Page("views/live.py", title="Live", icon=":material/visibility:"),
        st.Page("views/metrics.py", title="Metrics", icon=":material/monitoring:"),
        st.Page("views/engine.py", title="Engine", icon=":material/memory:"),
    ]
    navigation = st.navigation(pages)
    login.sign_out_button()
else:
    navigation = st.navigation([st.Page(login.sign_in_page, title="Sign in", url_path="signin")], position="hidden")
navigation.run()
