"""Say what is loading: a page's first view after a server start imports PyTorch and the rest of its modules,
seconds during which the main area would otherwise stay blank."""

from __future__ import annotations

import sys
import threading

import streamlit as st

_viewed: set[str] = set()  # pages run in this server process (module state outlives reruns and sessions)
_lock = threading.Lock()


def run_page(page: st.Page) -> None:
    """Run `page`; on its first view in this process, under a spinner that says what is loading (shown only
    when that takes longer than half a second)."""
    with _lock:
        first = page.url_path not in _viewed
        _viewed.add(page.url_path)
    if not first:
        page.run()
        return
    message = ("Starting up: loading PyTorch and this page's tools (a few seconds, once after the server starts)…"
               if "torch" not in sys.modules else "Loading this page's tools (once after the server starts)…")
    with st.spinner(message):
        page.run()
