"""The Predict page through AppTest: a real model trained at 32 px, real uploads, real files on disk."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from conftest import failed_after, one_torch_thread, open_app_page
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import job, rundir, runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.feedback import digest_of
from core.fileio import read_json
from core.model import ModelConfig
from core.train import TrainConfig

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a finished run's directory, its dataset): trained once for the whole module."""
    home = tmp_path_factory.mktemp("predict_home")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("LOUPE_HOME", str(home))
        dataset = make_demo_dataset(home / "demo", DemoSpec(n_per_class=10, size=32, seed=1))
        cfg = TrainConfig(
            data=DataConfig(path=str(dataset), size=32, batch_size=4, num_workers=0),
            model=ModelConfig(pretrained=False),
            schedule="one_cycle",
            epochs=2,
            mixed_precision=False,
        )
        run_dir = runs.create(cfg.to_dict(), root=home / "runs")
        assert job.run_training(run_dir) == 0
    return run_dir, dataset


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained) -> Path:
    """A fresh workspace per test whose runs folder is the module's (so feedback never leaks between tests)."""
    run_dir, _ = trained
    (tmp_path / "runs").symlink_to(run_dir.parent, target_is_directory=True)
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    return tmp_path


def open_predict() -> AppTest:
    return open_app_page("app_pages/predict.py")


def png(path: Path) -> bytes:
    return path.read_bytes()


def jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def image_captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


VOCAB = ["circle", "square", "triangle"]


def test_no_model_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    at = open_predict()
    assert "No trained model yet" in at.info[0].value
    assert not at.file_uploader


def test_a_failed_newest_run_does_not_pass_for_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained):
    run_dir, _ = trained
    failed = failed_after(run_dir, tmp_path).name
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path))
    at = open_predict()
    assert at.selectbox(key="predict_model").value == run_dir.name
    (note,) = [w.value for w in at.warning]
    assert failed in note and "failed" in note and run_dir.name in note


def test_one_image_gives_a_bar_chart_and_wrong_answers_become_feedback(home: Path, trained):
    run_dir, dataset = trained
    image = min((dataset / "circle").glob("*.png"))
    data = png(image)
    at = open_predict()
    assert at.selectbox(key="predict_model").value == run_dir.name
    sides = Counter(item["split"] for item in read_json(run_dir / rundir.DATASET_RECORD_FILE)["items"])
    split = f"random 20% split per class, seed 42: {sides['train']} train · {sides['valid']} valid"
    assert any(split in c.value for c in at.caption)  # the split the model was trained and validated on
    at.file_uploader(key="predict_files").set_value((image.name, data, "image/png")).run()
    assert not at.exception, at.exception
    assert len(charts(at)) == 1
    headline = [m.value for m in at.markdown if m.value.startswith("#### ")]
    assert len(headline) == 1 and headline[0].split()[1] in VOCAB and headline[0].endswith("%")
    assert not at.error

    key = digest_of(data)[:16]
    at.selectbox(key=f"predict_fb_label_{key}").set_value("square")
    at.button(key=f"predict_fb_save_{key}").click().run()
    assert not at.exception, at.exception
    saved = home / "feedback" / "square" / f"{key}.png"
    assert saved.read_bytes() == data
    assert any("Saved as feedback" in s.value and "square" in s.value for s in at.success)
    assert (home / "feedback" / ".feedback_log.jsonl").read_text().count("\n") == 1


def test_many_images_give_a_table_and_a_csv(home: Path, trained):
    _, dataset = trained
    images = [min((dataset / c).glob("*.png")) for c in VOCAB]
    at = open_predict()
    at.file_uploader(key="predict_files").set_value([(p.name, png(p), "image/png") for p in images]).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value  # a display-only dataframe carries no key in AppTest
    assert list(table["file"]) == [p.name for p in images]
    assert set(table["prediction"]) <= set(VOCAB)
    assert table["probability"].between(0, 1).all()
    csv = at.download_button(key="predict_csv")
    assert csv.label == "Download CSV"
    assert len(charts(at)) == 1  # the close look at the first image
    at.selectbox(key="predict_pick").set_value(2).run()
    assert not at.exception
    assert image_captions(at) == [f"{images[2].name} · 32x32"]


def test_bad_uploads_get_a_clear_message_and_nothing_is_written(home: Path, trained):
    _, dataset = trained
    good = min((dataset / "square").glob("*.png"))
    at = open_predict()
    at.file_uploader(key="predict_files").set_value(
        [
            ("notes.png", b"these are my notes, not a picture\n" * 10, "image/png"),
            ("huge.jpg", b"\xff\xd8\xff" + bytes(26 * 2**20), "image/jpeg"),
            ("empty.gif", b"", "image/gif"),
            (good.name, png(good), "image/png"),
        ]
    ).run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 3
    assert "notes.png" in errors[0] and "not an image" in errors[0]
    assert "huge.jpg" in errors[1] and "over the 25 MB limit" in errors[1]
    assert "empty.gif" in errors[2] and "empty" in errors[2]
    assert len(charts(at)) == 1  # the good one is still classified
    assert not (home / "feedback").exists()


def test_a_camera_shot_is_classified(home: Path, trained):
    _, dataset = trained
    shot = jpeg(min((dataset / "triangle").glob("*.png")))
    at = open_predict()
    at.radio(key="predict_source").set_value("Camera").run()
    at.camera_input(key="predict_camera").upload("shot.jpg", shot).run()
    assert not at.exception, at.exception
    assert len(charts(at)) == 1
    assert image_captions(at) == ["shot.jpg · 32x32"]


def test_the_tta_switch_predicts_with_test_time_augmentation(home: Path, trained):
    from core.bundle import load_bundle, predict_probs
    from core.feedback import read_image
    from core.tta import predict_probs_tta

    run_dir, dataset = trained
    images = [min((dataset / c).glob("*.png")) for c in VOCAB]
    bundle = load_bundle(run_dir, device="cpu")
    pixels = [read_image(png(p), min_side=max(2 * bundle.meta.size, 256)).image for p in images]
    at = open_predict()
    at.file_uploader(key="predict_files").set_value([(p.name, png(p), "image/png") for p in images]).run()
    plain = at.dataframe[0].value["probability"].to_numpy()
    assert plain == pytest.approx(predict_probs(bundle, pixels).max(dim=1).values.numpy(), abs=1e-6)
    at.toggle(key="predict_tta").set_value(True).run()
    assert not at.exception, at.exception
    tta = at.dataframe[0].value["probability"].to_numpy()
    # the page classifies each upload on its own (cached per image): each image gets the seed's first draws
    alone = [float(predict_probs_tta(bundle, [image]).max()) for image in pixels]
    assert tta == pytest.approx(alone, abs=1e-6) and tta != pytest.approx(plain, abs=1e-4)
