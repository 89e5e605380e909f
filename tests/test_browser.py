"""One real-browser test: `streamlit run app.py` driven by Playwright in Debian's Chromium.

Skips with the reason where Chromium is missing, unless LOUPE_REQUIRE_BROWSER=1 (CI sets it), where
it fails instead. Screenshots of every page land in tests/artifacts/ for people to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser_support import CHROMIUM_ARGS, find_chromium, streamlit_server, wait_for_app
from core import runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.fileio import atomic_write_json
from core.job import run_training
from core.model import ModelConfig
from core.train import TrainConfig

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PAGES = ["", "train", "interpret", "clean", "predict", "runs"]

chromium = find_chromium()
if chromium is None:
    if os.environ.get("LOUPE_REQUIRE_BROWSER") == "1":
        raise RuntimeError("LOUPE_REQUIRE_BROWSER=1 but no Chromium found (apt-get install chromium).")
    pytest.skip("Chromium not installed (apt-get install chromium); the browser test needs it.", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace as a user has it after the demo workflow: the demo dataset and one finished run."""
    home = tmp_path_factory.mktemp("browser-home")
    old = os.environ.get("LOUPE_HOME")
    os.environ["LOUPE_HOME"] = str(home)
    try:
        demo = make_demo_dataset(home / "demo", DemoSpec(n_per_class=20, size=32, seed=5))
        atomic_write_json(home / "recent.json", [str(demo)])
        cfg = TrainConfig(
            data=DataConfig(path=str(demo), size=32, batch_size=8, num_workers=0),
            model=ModelConfig(pretrained=False),
            schedule="one_cycle",
            epochs=2,
            lr=1e-2,
        )
        run_dir = runs.create(cfg.to_dict(), root=home / "runs", name_hint="browser")
        assert run_training(run_dir) == 0
    finally:
        if old is None:
            os.environ.pop("LOUPE_HOME")
        else:
            os.environ["LOUPE_HOME"] = old
    return home


def test_the_workflow_in_a_real_browser(workspace):
    ARTIFACTS.mkdir(exist_ok=True)
    image = next((workspace / "demo" / "circle").glob("*.png"))
    with streamlit_server(workspace) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        for name in PAGES:
            page.goto(f"{url}/{name}")
            wait_for_app(page)
            assert page.locator("[data-testid='stException']").count() == 0, f"exception on page {name!r}"
            page.screenshot(path=str(ARTIFACTS / f"{name or 'data'}.png"), full_page=True)

        # Interpret: the top-losses gallery shows real images.
        page.goto(f"{url}/interpret")
        wait_for_app(page)
        gallery = page.locator("[data-testid='stMain'] [data-testid='stImage'] img")
        gallery.first.wait_for(timeout=60_000)
        assert gallery.count() >= 4
        assert gallery.first.evaluate("img => img.naturalWidth") > 0

        # Predict: upload an image and see a prediction.
        page.goto(f"{url}/predict")
        wait_for_app(page)
        page.locator("[data-testid='stFileUploader'] input[type='file']").first.set_input_files(str(image))
        page.locator("[data-testid='stMain'] .js-plotly-plot").first.wait_for(timeout=60_000)
        wait_for_app(page)
        main_text = page.locator("[data-testid='stMain']").inner_text()
        assert any(label in main_text for label in ("circle", "square", "triangle"))
        page.screenshot(path=str(ARTIFACTS / "predict-upload.png"), full_page=True)
        browser.close()
    assert not errors, errors
