"""Run the real app for browser tests and screenshots: `streamlit run app.py` on a free port, Chromium via
Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Flags for a headless Chromium on a machine with no network beyond localhost (and as root in CI).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    found = os.environ.get("LOUPE_CHROMIUM") or next((p for p in CHROMIUM_CANDIDATES if Path(p).exists()), None)
    return found or shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(home: Path, timeout: float = 90, env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve app.py with LOUPE_HOME=home (and `env` on top); yields the base URL; stops the server afterwards."""
    port = free_port()
    env = {**os.environ, "LOUPE_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})}
    log = open(home / "streamlit.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start; see {home / 'streamlit.log'}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for_app(page, timeout_ms: int = 90_000) -> None:
    """Wait until the page's script has run: its title is drawn, and Streamlit's running indicator, spinners
    and element placeholders have been gone for a second."""
    page.wait_for_selector("[data-testid='stMain'] [data-testid='stHeading']", timeout=timeout_ms)
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_since = None
    while time.monotonic() < deadline:
        busy = "[data-testid='stStatusWidget'], [data-testid='stSpinner'], [data-testid='stSkeleton']"
        if page.locator(busy).count() == 0:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 1.0:
                return
        else:
            quiet_since = None
        time.sleep(0.2)


def watch_network(context) -> list[str]:
    """Record every request of a browser context that fails or leaves this machine (the app promises to need no
    network: an offline machine would see each one fail); returns the list it keeps appending to."""
    problems: list[str] = []
    local = ("http://localhost:", "http://127.0.0.1:", "ws://localhost:", "ws://127.0.0.1:", "data:", "blob:")

    def on_request(request) -> None:
        if not request.url.startswith(local):
            problems.append(f"left the machine: {request.url}")

    def on_failed(request) -> None:
        if request.failure != "net::ERR_ABORTED":  # a reload or a page switch cancels what is in flight
            problems.append(f"failed: {request.url} ({request.failure})")

    context.on("request", on_request)
    context.on("requestfailed", on_failed)
    return problems


def no_dialog(page) -> bool:
    """No Streamlit modal (such as "Page not found") is open on `page`."""
    return page.locator("[role='dialog']").count() == 0 and page.get_by_text("Page not found").count() == 0
