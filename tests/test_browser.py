"""One real-browser test: `streamlit run app.py` driven by Playwright in Debian's Chromium.

Skips with the reason where Chromium is missing, unless LOUPE_REQUIRE_BROWSER=1 (CI sets it), where
it fails instead. Screenshots of every page land in tests/artifacts/ for people to look at.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from browser_support import CHROMIUM_ARGS, find_chromium, no_dialog, streamlit_server, wait_for_app, watch_network

from core import runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.env import runs_dir
from core.fileio import atomic_write_json
from core.health import check_health
from core.healthjob import job_folder, save_report
from core.job import run_training
from core.labelcheck import CheckSettings, create_check, run_label_check
from core.model import ModelConfig
from core.train import TrainConfig

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PAGES = ["", "data", "train", "interpret", "clean", "predict", "runs"]
RUN_TIMEOUT_S = 300  # the demo's default run: seconds on a free CPU, longer on a shared one

chromium = find_chromium()
if chromium is None:
    if os.environ.get("LOUPE_REQUIRE_BROWSER") == "1":
        raise RuntimeError("LOUPE_REQUIRE_BROWSER=1 but no Chromium found (apt-get install chromium).")
    pytest.skip("Chromium not installed (apt-get install chromium); the browser test needs it.",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A workspace as a user has it after the demo workflow: the demo dataset, one finished run, a label check
    and the Data page's health report of the dataset with that run's model."""
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
        check = create_check(cfg, CheckSettings(folds=2), root=home / "runs")  # Clean then ranks by it
        assert run_label_check(check) == 0
        page_cfg = DataConfig(path=str(demo))  # how the Data page reads the folder by default: its report's folder
        report = check_health(page_cfg, run_dir)
        save_report(report, job_folder(page_cfg, runs_dir() / run_dir.name))
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

        for name in PAGES[1:]:
            page.goto(f"{url}/{name}")
            wait_for_app(page)
            assert page.locator("[data-testid='stException']").count() == 0, f"exception on page {name!r}"
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

        # Interpret: the top-losses gallery shows real images.
        page.goto(f"{url}/interpret")
        wait_for_app(page)
        gallery = page.locator("[data-testid='stMain'] [data-testid='stImage'] img")
        gallery.first.wait_for(timeout=60_000)
        assert gallery.count() >= 4
        assert gallery.first.evaluate("img => img.naturalWidth") > 0

        # Clean: ranked by the label check, each image with the check's evidence; the loss ranking one click away.
        page.goto(f"{url}/clean")
        wait_for_app(page)
        ranking = page.locator(".st-key-clean_ranking")
        ranking.get_by_text("Label check (out of sample)").wait_for(timeout=60_000)
        main = page.locator("[data-testid='stMain']")
        main.get_by_text("counted as mislabelled by confident learning").wait_for(timeout=60_000)
        assert main.get_by_text(re.compile(r"score \d\.\d\d")).count() >= 4
        assert main.locator("[data-testid='stImage'] img").count() >= 4
        page.screenshot(path=str(ARTIFACTS / "clean-check.png"), full_page=True)
        ranking.get_by_text("Training loss (in sample)").click()
        wait_for_app(page)
        main.get_by_text(re.compile(r"loss -?\d+\.\d\d")).first.wait_for(timeout=60_000)
        assert page.locator("[data-testid='stException']").count() == 0

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


def _lasso(page, plot, corners: list[tuple[float, float]]) -> None:
    """Drag the mouse over `plot`'s drawing area through `corners` (fractions of its width and height)."""
    area = plot.locator(".nsewdrag").first
    area.wait_for(timeout=60_000)
    box = area.bounding_box()
    points = [(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy) for fx, fy in corners]
    page.mouse.move(*points[0])
    page.mouse.down()
    for x, y in points[1:] + points[:1]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def test_the_data_map_selects_images_and_sends_them_to_clean(workspace):
    """Issue 13: on the Data page's health Map, a lasso around every dot shows their images; "Delete these N in
    Clean" opens Clean with the N staged to delete."""
    ARTIFACTS.mkdir(exist_ok=True)
    n_images = sum(1 for _ in (workspace / "demo").rglob("*.png"))
    with streamlit_server(workspace) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        _open(page, f"{url}/data")
        page.get_by_role("tab", name="Map").click()
        plot = page.locator("[class*='st-key-data_map_label'] .js-plotly-plot")
        plot.wait_for(timeout=60_000)
        main = page.locator("[data-testid='stMain']")
        assert main.get_by_text("select points").count() >= 1  # the caption says how to see the images
        page.locator("[class*='st-key-data_map_label']").scroll_into_view_if_needed()
        _lasso(page, plot, [(0.005, 0.005), (0.995, 0.005), (0.995, 0.995), (0.005, 0.995)])
        main.get_by_text(f"{n_images} images selected").wait_for(timeout=60_000)
        wait_for_app(page)
        shown = main.locator("[data-testid='stTabPanel'] [data-testid='stImage'] img:visible")  # the Map tab's
        shown.first.wait_for(timeout=60_000)
        assert shown.count() == min(n_images, 48)
        assert shown.first.evaluate("img => img.naturalWidth") > 0
        page.screenshot(path=str(ARTIFACTS / "data-map-selected.png"), full_page=True)

        page.get_by_role("button", name=f"Delete these {n_images} in Clean").click()
        page.wait_for_url("**/clean", timeout=60_000)
        wait_for_app(page)
        staged = main.locator("[data-testid='stMarkdownContainer']", has_text="to delete")
        staged.first.wait_for(timeout=60_000)
        assert re.search(rf"\b{n_images}\s+to delete,\s+0\s+to relabel", staged.first.inner_text()), \
            staged.first.inner_text()
        assert page.locator("[data-testid='stException']").count() == 0
        page.screenshot(path=str(ARTIFACTS / "data-map-to-clean.png"), full_page=True)
        browser.close()
    assert not errors, errors


@pytest.fixture
def fresh_home(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty workspace, and a torch hub folder without any weights: a first start on an offline machine."""
    (tmp_path / "home").mkdir()
    (tmp_path / "torch-hub").mkdir()
    return tmp_path / "home", {"TORCH_HOME": str(tmp_path / "torch-hub")}


def _open(page, url: str) -> None:
    page.goto(url)
    wait_for_app(page)
    assert no_dialog(page), f"a dialog on {url}"
    assert page.locator("[data-testid='stException']").count() == 0, f"exception on {url}"


def _form(page) -> dict:
    """What the Train form shows, by the TrainConfig field it sets."""
    return {
        "arch": page.locator(".st-key-train_arch input").input_value(),
        "pretrained": page.locator(".st-key-train_pretrained input[type='checkbox']").is_checked(),
        "schedule": page.locator(".st-key-train_schedule input").input_value(),
        "epochs": page.locator(".st-key-train_epochs input").input_value(),
        "lr": page.locator(".st-key-train_lr input").input_value(),
        "size": page.locator(".st-key-train_size input").input_value(),
        "batch_size": page.locator(".st-key-train_bs input").input_value(),
    }


def test_a_fresh_offline_start_opens_every_page_by_its_path_and_trains_the_demo_with_the_defaults(fresh_home):
    """Issue 17: every page's own path works as the first request to a fresh server (no "Page not found").
    Issue 10: nothing is fetched from the network (the tab icon was); the demo trains to `done` with the
    form's defaults (only fewer epochs, which keeps this quick and tells the run's settings from the
    defaults); after a reload the form holds that run's settings."""
    home, offline = fresh_home
    with streamlit_server(home, env=offline) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        network = watch_network(context)
        for name in PAGES[1:] + [""]:  # /data first: the deep link a fresh server used to miss
            _open(context.new_page(), f"{url}/{name}")
        page = context.new_page()
        _open(page, url)
        assert page.url.rstrip("/").endswith("/data")  # the root opens Data at its own path
        assert page.locator("link[rel='shortcut icon']").get_attribute("href").startswith("data:")

        page.locator(".st-key-data_demo button").click()
        page.get_by_text("circle", exact=False).first.wait_for(timeout=60_000)
        wait_for_app(page)
        page.locator("[data-testid='stSidebarNav'] a", has_text="Train").click()
        page.wait_for_url("**/train")
        page.get_by_role("heading", name="Train").wait_for(timeout=60_000)
        wait_for_app(page)
        epochs = page.locator(".st-key-train_epochs input")
        epochs.fill("1")
        epochs.press("Enter")
        wait_for_app(page)
        page.locator(".st-key-train_start button").click()
        wait_for_app(page)
        [run_dir] = [p for p in (home / "runs").iterdir() if p.is_dir()]
        final = runs.wait(run_dir, timeout=RUN_TIMEOUT_S)
        assert final["state"] == runs.DONE, final
        header = page.locator("[data-testid='stMain'] h4", has_text=run_dir.name)
        header.filter(has_text=re.compile(r"\bdone\s*$")).wait_for(timeout=60_000)  # the live view saw it end

        page.reload()
        page.get_by_role("heading", name="Train").wait_for(timeout=60_000)
        wait_for_app(page)
        config = json.loads((run_dir / runs.CONFIG_FILE).read_text())
        shown = _form(page)
        assert config["model"]["pretrained"] is False and config["schedule"] == "one_cycle"  # offline defaults
        assert config["epochs"] == 1
        assert shown == {
            "arch": config["model"]["arch"], "pretrained": config["model"]["pretrained"],
            "schedule": config["schedule"], "epochs": str(config["epochs"]), "lr": f"{config['lr']:g}",
            "size": str(config["data"]["size"]), "batch_size": str(config["data"]["batch_size"]),
        }
        page.screenshot(path=str(ARTIFACTS / "train-after-reload.png"), full_page=True)
        browser.close()
    assert not network, network
