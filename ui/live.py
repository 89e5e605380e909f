"""Following a background run (training, a sweep, a label check) live: a fragment that polls its status and
redraws, and reruns the whole page once the run is final. Shared by Train and Clean."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import streamlit as st

from core import runs

POLL_SECONDS = 1.0


def safe_status(run_dir: Path) -> dict:
    try:
        return runs.status(run_dir)
    except (OSError, ValueError) as exc:
        return {"state": runs.UNREADABLE, "error": f"Cannot read the run's status: {exc}"}


def live_fragment(run_dir: Path, body: Callable[[Path, dict, bool], None]) -> None:
    """Draw `body` in a fragment that redraws it each poll and reruns the whole page once the run is final,
    so the parts outside the fragment (buttons, the sidebar) catch up and the polling stops."""

    def live() -> None:
        status = safe_status(run_dir)
        if status.get("state") not in runs.ACTIVE_STATES:
            st.rerun()
        body(run_dir, status, True)

    st.fragment(live, run_every=POLL_SECONDS)()
