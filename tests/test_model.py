"""core.model on the CPU with real torchvision models: no downloads, no mocks."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image
from torchvision.models import get_model, get_model_weights

from core.bundle import Bundle, BundleError, BundleMeta, load_bundle, predict, predict_probs, preprocess, save_bundle
from core.model import (
    ARCHS,
    NORM_TYPES,
    ModelConfig,
    UnsafeWeightsError,
    WeightsUnavailableError,
    build_model,
    freeze,
    install_pretrained,
    is_frozen,
    lrs_for_groups,
    param_groups,
    pretrained_available,
    pretrained_cache_path,
    unfreeze,
)

N_OUT = 3
VOCAB = ["cat", "dog", "fox"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request) -> tuple[str, torch.nn.Sequential]:
    """Each architecture built once for the module (vgg16_bn and convnext take a while to initialise)."""
    torch.manual_seed(0)
    return request.param, build_model(ModelConfig(arch=request.param, pretrained=False), N_OUT)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache under tmp: TORCH_HOME is what torch.hub.get_dir() reads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "torch" / "hub", "torch.hub.set_dir() was called elsewhere; TORCH_HOME is ignored"
    return hub


def _images(n: int = 2, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


def _meta(**kw) -> BundleMeta:
    return BundleMeta(**{"arch": "resnet18", "vocab": VOCAB, "size": 32, **kw})


def _trainable(params) -> set[int]:
    return {id(p) for p in params if p.requires_grad}


# ---------------------------------------------------------------------------------------------- architectures


def test_arch_builds_with_table_channels_and_output_shape(arch_model):
    arch, model = arch_model
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        features = model[0](x)
        out = model(x)
    assert features.ndim == 4 and features.shape[1] == ARCHS[arch].channels
    assert out.shape == (2, N_OUT)


def test_freeze_keeps_only_head_and_norm_layers_trainable(arch_model):
    _, model = arch_model
    freeze(model)
    try:
        assert is_frozen(model)
        norm_params = {id(p) for m in model[0].modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
        head_params = {id(p) for p in model[1].parameters()}
        assert _trainable(model.parameters()) == head_params | norm_params
        assert _trainable(model[0].parameters()) == norm_params
    finally:
        unfreeze(model)
    assert not is_frozen(model)
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_cover_every_parameter_once(arch_model):
    arch, model = arch_model
    groups = param_groups(model, arch)
    assert len(groups) == 3 and all(groups)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in groups[2]} == {id(p) for p in model[1].parameters()}


def test_resnet_split_matches_fastai():
    model = build_model(ModelConfig(arch="resnet18", pretrained=False), N_OUT)
    groups = param_groups(model, "resnet18")
    assert {id(p) for p in groups[1]} == {id(p) for p in [*model[0].layer3.parameters(), *model[0].layer4.parameters()]}


def test_heads():
    fastai = build_model(ModelConfig(arch="resnet18", pretrained=False, dropout=0.4), N_OUT)[1]
    dropouts = [m.p for m in fastai if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [pytest.approx(0.2), pytest.approx(0.4)]
    assert fastai[2].num_features == 2 * 512 and fastai[-1].out_features == N_OUT
    assert fastai[4].bias is None
    linear = build_model(ModelConfig(arch="resnet18", pretrained=False, head="linear"), N_OUT)[1]
    assert [type(m).__name__ for m in linear] == ["AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert linear[-1].in_features == 512 and torch.all(linear[-1].bias == 0)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="resnet18.*convnext_tiny"):
        ModelConfig(arch="resnet1000")
    with pytest.raises(ValueError, match="head"):
        ModelConfig(head="mlp")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="n_out"):
        build_model(ModelConfig(pretrained=False), 0)


# ---------------------------------------------------------------------------------------------- learning rates


def test_lrs_for_groups_tuple_spreads_geometrically():
    lrs = lrs_for_groups((1e-5, 1e-3), 3)
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-3)
    assert lrs[1] / lrs[0] == pytest.approx(lrs[2] / lrs[1]) == pytest.approx(10.0)
    five = lrs_for_groups((1e-6, 1e-2), 5)
    assert all(math.isclose(b / a, 10.0) for a, b in itertools.pairwise(five))


def test_lrs_for_groups_single_lr_is_fastai_slice():
    assert lrs_for_groups(1e-3, 3) == pytest.approx([1e-4, 1e-4, 1e-3])
    assert lrs_for_groups(1e-3, 1) == pytest.approx([1e-3])
    with pytest.raises(ValueError):
        lrs_for_groups(0.0, 3)


# ---------------------------------------------------------------------------------------------- weights


def _expected_body(arch: str, state: dict[str, torch.Tensor], model: torch.nn.Sequential) -> None:
    """Every body tensor equals the saved one (torchvision names: resnet keeps them, others under features.)."""
    prefix = "" if ARCHS[arch].body_attr is None else f"{ARCHS[arch].body_attr}."
    body_state = model[0].state_dict()
    assert body_state, "empty body"
    for key, value in body_state.items():
        assert torch.equal(value, state[prefix + key]), key


def test_pretrained_loads_weights_from_hub_cache(hub_dir):
    torch.manual_seed(123)
    reference = get_model("resnet18", weights=None).state_dict()
    url = get_model_weights("resnet18").DEFAULT.url
    cached = hub_dir / "checkpoints" / os.path.basename(url)
    assert pretrained_cache_path("resnet18") == cached
    cached.parent.mkdir(parents=True)
    torch.save(reference, cached)
    torch.manual_seed(999)  # a different seed, so a random init could not match by accident
    model = build_model(ModelConfig(arch="resnet18", pretrained=True), N_OUT)
    _expected_body("resnet18", reference, model)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_path_loads_local_file(tmp_path, suffix):
    arch = "mobilenet_v3_small"  # a `.features` body, unlike the resnet above
    torch.manual_seed(7)
    reference = get_model(arch, weights=None).state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    else:
        torch.save(reference, path)
    torch.manual_seed(8)
    model = build_model(ModelConfig(arch=arch, pretrained=False, weights_path=str(path)), N_OUT)
    _expected_body(arch, reference, model)


def test_weights_of_another_arch_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="resnet34"):
        build_model(ModelConfig(arch="resnet34", weights_path=str(path)), N_OUT)


def test_offline_pretrained_raises_with_file_path(hub_dir, monkeypatch):
    # Route https through a closed local port so the download fails fast even on a machine with internet.
    for var in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    try:
        build_model(ModelConfig(arch="resnet18", pretrained=True), N_OUT)
    except WeightsUnavailableError as err:
        message = str(err)
    else:
        pytest.skip("the ImageNet weights downloaded after all; the offline path cannot be exercised here")
    expected = hub_dir / "checkpoints" / os.path.basename(get_model_weights("resnet18").DEFAULT.url)
    assert str(expected) in message
    assert get_model_weights("resnet18").DEFAULT.url in message
    # Read on the Train page and on the command line alike: no option name of either, no code names.
    assert "weights file" in message and "from scratch" in message
    assert "weights_path" not in message and "pretrained=False" not in message


def test_pretrained_available_follows_the_hub_cache(hub_dir):
    assert not pretrained_available("resnet18")
    pretrained_cache_path("resnet18").parent.mkdir(parents=True)
    torch.save(get_model("resnet18", weights=None).state_dict(), pretrained_cache_path("resnet18"))
    assert pretrained_available("resnet18") and not pretrained_available("resnet34")


@pytest.mark.parametrize("form", ["wrapped.pth", "plain.safetensors"])
def test_a_given_weights_file_is_checked_and_placed_where_pretrained_runs_find_it(hub_dir, tmp_path, form):
    torch.manual_seed(5)
    reference = get_model("resnet18", weights=None).state_dict()
    given = tmp_path / form
    if given.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in reference.items()}, str(given))
    else:
        torch.save({"state_dict": reference}, given)  # a training checkpoint's wrapper, unwrapped on the way
    target = install_pretrained("resnet18", given)
    assert target == pretrained_cache_path("resnet18") and pretrained_available("resnet18")
    assert set(torch.load(target, weights_only=True)) == set(reference)  # the plain state dict torchvision reads
    torch.manual_seed(6)
    _expected_body("resnet18", reference, build_model(ModelConfig(arch="resnet18", pretrained=True), N_OUT))
    assert install_pretrained("resnet18", given) == target  # the same weights again: accepted, nothing changes


def test_a_weights_file_never_replaces_other_weights_already_in_place(hub_dir, tmp_path):
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), first)
    torch.save(get_model("resnet18", weights=None).state_dict(), second)  # another random init
    target = install_pretrained("resnet18", first)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match="already other resnet18 weights"):
        install_pretrained("resnet18", second)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left behind


def test_weights_files_that_do_not_fit_are_refused_before_anything_is_placed(hub_dir, tmp_path):
    other = tmp_path / "r18.pth"
    torch.save(get_model("resnet18", weights=None).state_dict(), other)
    with pytest.raises(ValueError, match="resnet34"):
        install_pretrained("resnet34", other)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Exploit(marker)}, evil)
    with pytest.raises(UnsafeWeightsError):
        install_pretrained("resnet18", evil)
    not_weights = tmp_path / "notes.safetensors"
    not_weights.write_text("not a tensor file")
    with pytest.raises(ValueError, match="safetensors"):
        install_pretrained("resnet18", not_weights)
    text = tmp_path / "notes.pth"
    text.write_text("not a tensor file")  # not called unsafe: it is no pickle at all
    with pytest.raises(ValueError, match="not a PyTorch weights file") as refused:
        install_pretrained("resnet18", text)
    assert not isinstance(refused.value, UnsafeWeightsError)
    assert not marker.exists() and not pretrained_available("resnet18") and not pretrained_available("resnet34")


class _Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Exploit(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(UnsafeWeightsError, match="Refused"):
        build_model(ModelConfig(arch="resnet18", weights_path=str(evil)), N_OUT)
    assert not marker.exists()
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (bundle_dir / "model.safetensors").write_bytes(evil.read_bytes())
    with pytest.raises(BundleError, match="Not a Loupe bundle"):
        load_bundle(bundle_dir, device="cpu")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- bundles


def _eval_bundle(meta: BundleMeta) -> Bundle:
    torch.manual_seed(0)
    return Bundle(model=build_model(meta.model_config(), meta.n_out).eval(), meta=meta)


def test_bundle_round_trip_predicts_identically(tmp_path):
    meta = _meta(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    original = _eval_bundle(meta)
    written = save_bundle(tmp_path / "run", original.model, meta)
    assert written == tmp_path / "run" / "model.safetensors"
    assert [p.name for p in written.parent.iterdir()] == ["model.safetensors"]  # no temp files left
    loaded = load_bundle(tmp_path / "run", device="cpu")
    assert loaded.meta == meta and loaded.meta.to_dict()["n_out"] == 3
    assert not loaded.model.training
    images = _images(3)
    expected = predict_probs(original, images, batch_size=2)
    got = predict_probs(loaded, images, batch_size=2)
    assert got.shape == (3, 3)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert torch.allclose(got.sum(dim=1), torch.ones(3), atol=1e-5)


def test_bundle_loads_from_file_path_for_features_arch(tmp_path):
    meta = _meta(arch="mobilenet_v3_small", head="linear")
    original = _eval_bundle(meta)
    path = save_bundle(tmp_path / "mobile.safetensors", original.model, meta)
    loaded = load_bundle(path, device="cpu")
    images = _images(2)
    assert torch.allclose(predict_probs(loaded, images), predict_probs(original, images), atol=1e-6, rtol=0)


def test_predict_returns_sorted_top_k_from_vocab(tmp_path):
    bundle = _eval_bundle(_meta())
    results = predict(bundle, _images(2), top_k=2)
    assert len(results) == 2
    for row in results:
        assert len(row) == 2
        labels, probs = zip(*row)
        assert set(labels) <= set(VOCAB) and len(set(labels)) == 2
        assert list(probs) == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-6
    assert len(predict(bundle, _images(1), top_k=10)[0]) == len(VOCAB)


def test_multi_label_bundle_uses_sigmoid():
    bundle = _eval_bundle(_meta(task="multi_label", threshold=0.3))
    images = _images(2)
    probs = predict_probs(bundle, images)
    with torch.inference_mode():
        logits = bundle.model(preprocess(bundle, images))
    assert torch.allclose(probs, logits.sigmoid(), atol=1e-6)
    assert not torch.allclose(probs, logits.softmax(dim=1), atol=1e-3)


def test_bundle_errors_are_clear(tmp_path):
    model = _eval_bundle(_meta()).model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    no_meta = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(state, str(no_meta))
    with pytest.raises(BundleError, match="no 'loupe' metadata"):
        load_bundle(no_meta, device="cpu")
    bad_json = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(bad_json), metadata={"loupe": "{not json"})
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bad_json, device="cpu")
    with pytest.raises(BundleError, match="task"):
        BundleMeta.from_dict({**_meta().to_dict(), "task": "regression"})
    with pytest.raises(BundleError, match="n_out"):
        BundleMeta.from_dict({**_meta().to_dict(), "n_out": 7})
    with pytest.raises(FileNotFoundError):
        load_bundle(tmp_path / "nowhere", device="cpu")
    wrong_arch = tmp_path / "wrong.safetensors"
    wrong_meta = json.dumps(_meta(arch="resnet50").to_dict())
    safetensors.torch.save_file(state, str(wrong_arch), metadata={"loupe": wrong_meta})
    with pytest.raises(BundleError, match="do not match"):
        load_bundle(wrong_arch, device="cpu")


def test_exif_rotated_image_predicts_like_upright(tmp_path):
    bundle = _eval_bundle(_meta())
    upright = _images(1, size=(48, 32))[0]
    # Orientation 6 means "rotate 90 degrees clockwise to display", so store the pixels turned the other way.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    with Image.open(path) as rotated:
        rotated.load()
    probs = predict_probs(bundle, [upright, rotated, stored])
    assert torch.allclose(probs[1], probs[0], atol=1e-6)
    assert not torch.allclose(probs[2], probs[0], atol=1e-6), "control: ignoring EXIF should change the answer"


# ---------------------------------------------------------------- issue 16: metadata from a hostile bundle

HOSTILE_META = {
    "size-huge": ({"size": 10000}, "size must be a whole number of pixels from 16 to 1024"),
    "size-bool": ({"size": True}, "size must be a whole number"),
    "mean-nan": ({"mean": [float("nan"), 0.5, 0.5]}, "mean needs 3 finite numbers"),
    "std-infinite": ({"std": [0.2, float("inf"), 0.2]}, "std needs 3 finite numbers"),
    "mean-text": ({"mean": "0.5"}, "mean needs 3 finite numbers"),
    "version-negative": ({"version": -5}, "bundle format -5 is not one this Loupe reads"),
    "vocab-string": ({"vocab": "abc", "n_out": 3}, "vocab must be a list of class names"),
    "vocab-numbers": ({"vocab": [1, 2, 3]}, "vocab must be a list of class names"),
    "threshold-text": ({"threshold": "0.5"}, "threshold must be a number"),
    "dropout-text": ({"dropout": "half"}, "arch and head must be names and dropout a number"),
    "config-text": ({"config": "x"}, "config must be a JSON object"),
}


def _bundle_with_meta(path: Path, **changes) -> Path:
    """A real bundle (weights that fit resnet18 with three classes) whose header metadata is changed by hand."""
    model = _eval_bundle(_meta()).model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path), metadata={"loupe": json.dumps({**_meta().to_dict(), **changes})})
    return path


@pytest.mark.parametrize("case", HOSTILE_META)
def test_every_metadata_field_is_checked_for_type_and_range(tmp_path, case):
    changes, message = HOSTILE_META[case]
    with pytest.raises(BundleError, match=f"Not a valid Loupe bundle: {message}"):
        load_bundle(_bundle_with_meta(tmp_path / f"{case}.safetensors", **changes), device="cpu")


def test_the_cli_refuses_a_bundle_with_nan_normalisation_with_one_line(tmp_path):
    """Before: "prob": NaN (not JSON) and exit 0."""
    bundle = _bundle_with_meta(tmp_path / "nan.safetensors", mean=[float("nan"), 0.5, 0.5])
    image = tmp_path / "x.png"
    _images(1)[0].save(image)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "core", "predict", str(bundle), str(image)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "mean needs 3 finite numbers" in done.stderr
