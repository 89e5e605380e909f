"""How long the app keeps a person waiting: a cold start, a page switch and a reload while a run trains.

    python bench/ui_latency.py --repeat 3

A second table times the server's side alone: the Data and Train page scripts (warm, through Streamlit's
AppTest) while a run trains at the app's own CPU priority and at the lower one `core.runs.start` gives it.

Each measurement is a real `streamlit run app.py` in a fresh workspace (the demo dataset open) driven
by Debian's Chromium. Times are from the request to the first thing drawn in the main area (`first`)
and to the page having finished its script (`settled`: heading drawn, no running indicator, spinner or
placeholder). "During training" measurements run a long demo run (resnet18 from scratch,
one_cycle) in the background, as a user's would.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from browser_support import CHROMIUM_ARGS, find_chromium, streamlit_server  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from core import runs  # noqa: E402
from core.data import DataConfig  # noqa: E402
from core.demo import make_demo_dataset  # noqa: E402
from core.fileio import atomic_write_json  # noqa: E402
from core.model import ModelConfig  # noqa: E402
from core.train import TrainConfig  # noqa: E402

MAIN = "[data-testid='stMain']"
DRAWN = f"{MAIN} [data-testid='stHeading'], {MAIN} [data-testid='stSpinner'], {MAIN} [data-testid='stAlert']"
BUSY = "[data-testid='stStatusWidget'], [data-testid='stSpinner'], [data-testid='stSkeleton']"


def workspace(root: Path) -> Path:
    """The demo dataset, remembered as the open one."""
    home = root / "home"
    demo = make_demo_dataset(home / "demo")
    atomic_write_json(home / "recent.json", [str(demo)])
    return home


def demo_config(home: Path, epochs: int) -> TrainConfig:
    data = DataConfig(path=str(home / "demo"), size=64, batch_size=16)
    return TrainConfig(data=data, model=ModelConfig(pretrained=False), schedule="one_cycle", epochs=epochs)


def timed(page, action, heading: str) -> tuple[float, float]:
    """Seconds from `action()` to the first element in the main area, and to the page with `heading` settled."""
    start = time.perf_counter()
    action()
    page.wait_for_selector(DRAWN, timeout=120_000)
    first = time.perf_counter() - start
    page.get_by_role("heading", name=heading).first.wait_for(timeout=120_000)
    while page.locator(BUSY).count():
        time.sleep(0.05)
    return first, time.perf_counter() - start


def measure(home: Path) -> dict[str, tuple[float, float]]:
    out = {}
    with streamlit_server(home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        out["cold start: Data"] = timed(page, lambda: page.goto(url), "Data")
        out["Data -> Train (idle)"] = timed(page, lambda: page.locator("[data-testid='stSidebarNav'] a",
                                                                          has_text="Train").click(), "Train")
        run_dir = runs.create(demo_config(home, epochs=200).to_dict(), root=home / "runs")
        runs.start(run_dir)
        try:
            while not runs.load_events(run_dir, "batch"):  # past start-up, into the epochs
                time.sleep(0.5)
            page.reload()
            page.get_by_role("heading", name="Train").first.wait_for(timeout=120_000)
            time.sleep(3)
            out["Train -> Data (training)"] = timed(page, lambda: page.locator(
                "[data-testid='stSidebarNav'] a", has_text="Data").click(), "Data")
            out["Data -> Train (training)"] = timed(page, lambda: page.locator(
                "[data-testid='stSidebarNav'] a", has_text="Train").click(), "Train")
            time.sleep(3)
            out["reload Train (training)"] = timed(page, page.reload, "Train")
        finally:
            runs.request_stop(run_dir)
            runs.wait(run_dir, timeout=120)
        browser.close()
    return out


def script_seconds(home: Path, niceness: int | None, repeat: int = 5) -> dict[str, float]:
    """Median seconds of a warm Data and Train page script while a run trains at `niceness` (None: the same
    priority as this process, as runs were started before `core.runs.BACKGROUND_NICENESS`)."""
    from streamlit.testing.v1 import AppTest

    run_dir = runs.create(demo_config(home, epochs=200).to_dict(), root=home / "runs")
    pid = runs.start(run_dir)
    os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) if niceness is None else niceness)
    try:
        while not runs.load_events(run_dir, "batch"):
            time.sleep(0.5)
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
        at.run()
        out = {}
        for page in ("app_pages/data.py", "app_pages/train.py"):
            at.switch_page(page)
            at.run()  # the first view imports the page's modules; the ones timed below are warm
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                at.run()
                times.append(time.perf_counter() - start)
            out[page.split("/")[-1].removesuffix(".py")] = statistics.median(times)
        return out
    finally:
        runs.request_stop(run_dir)
        runs.wait(run_dir, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="fresh servers to measure on; the table shows the median")
    a = p.parse_args()
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory(prefix="loupe-latency-") as tmp:
            os.environ["LOUPE_HOME"] = str(Path(tmp) / "home")
            home = workspace(Path(tmp))
            for name, value in measure(home).items():
                results.setdefault(name, []).append(value)
    print("| moment | first drawn (s) | settled (s) |\n|---|---|---|")
    for name, values in results.items():
        first, settled = (statistics.median(v[i] for v in values) for i in (0, 1))
        print(f"| {name} | {first:.1f} | {settled:.1f} |")
    with tempfile.TemporaryDirectory(prefix="loupe-latency-") as tmp:
        os.environ["LOUPE_HOME"] = str(Path(tmp) / "home")
        home = workspace(Path(tmp))
        equal, lower = script_seconds(home, None), script_seconds(home, runs.BACKGROUND_NICENESS)
    print("\n| page script while a run trains | run at the app's priority (s) | run at nice "
          f"{runs.BACKGROUND_NICENESS} (s) |\n|---|---|---|")
    for page in equal:
        print(f"| {page} | {equal[page]:.2f} | {lower[page]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
