"""The Train page's starting weights: where they come from (one line), a weights file given by upload or path,
and the schedule that fits them (fine_tune on pretrained weights, one_cycle from scratch)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from core.config import TrainConfig
from core.env import check_data_path
from core.model import UnsafeWeightsError, install_pretrained, pretrained_available, pretrained_cache_path

WEIGHTS_UPLOAD_KEY = "train_weights_upload"
WEIGHTS_PATH_KEY = "train_weights_path"
WEIGHTS_NOTE_KEY = "train_weights_note"  # (kind, message) of the last weights file given, shown once
WEIGHTS_SUFFIXES = ("pth", "pt", "safetensors")


def match_schedule_to_weights() -> None:
    """fine_tune's frozen first phase only makes sense on pretrained weights: unticking Pretrained moves it to
    one_cycle, ticking it moves one_cycle back to fine_tune (plateau, a deliberate choice, stays)."""
    pretrained, schedule = st.session_state["train_pretrained"], st.session_state["train_schedule"]
    if not pretrained and schedule == "fine_tune":
        st.session_state["train_schedule"] = "one_cycle"
    elif pretrained and schedule == "one_cycle":
        st.session_state["train_schedule"] = "fine_tune"


def arch_changed() -> None:
    st.session_state["train_pretrained"] = pretrained_available(st.session_state["train_arch"])
    match_schedule_to_weights()


def weights_line(arch: str, source: Path | None) -> None:
    """One line on where the starting weights come from, so the defaults explain themselves."""
    if source is not None:
        st.caption(f":material/history: Starts from the model of run `{source.name}`: its weights, and so its "
                   "architecture and head.")
    elif pretrained_available(arch):
        st.caption(f":material/check_circle: The ImageNet weights for {arch} are on this machine, so the defaults "
                   "fine-tune them: *Pretrained* with *fine_tune*.")
    else:
        st.caption(f":material/cloud_off: The ImageNet weights for {arch} are not on this machine, so the defaults "
                   "train from scratch: *Pretrained* unticked, *one_cycle*. To fine-tune offline, give a weights file "
                   "below.")


def weights_file(arch: str) -> None:
    """Upload, or point at, a weights file; it is checked and put where every pretrained run looks."""
    target = pretrained_cache_path(arch)
    with st.expander(f"Weights file for {arch}", icon=":material/upload_file:"):
        st.caption(f"torchvision's ImageNet weights for {arch} as .pth or .safetensors (e.g. `{target.name}` "
                   f"downloaded on another machine). Loupe checks that the file holds only tensors that fit {arch}, "
                   f"then keeps a copy at `{target}`, where every run looks for it.")
        st.file_uploader("Upload the weights file", type=list(WEIGHTS_SUFFIXES), key=WEIGHTS_UPLOAD_KEY,
                         on_change=_weights_uploaded)
        c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
        c1.text_input("…or its path on this machine", key=WEIGHTS_PATH_KEY, placeholder=f"~/Downloads/{target.name}")
        c2.button("Use it", key="train_weights_use", on_click=_weights_path_given, width="stretch")
    note = st.session_state.pop(WEIGHTS_NOTE_KEY, None)
    if note:
        kind, message = note
        (st.success if kind == "success" else st.error)(message, icon=":material/upload_file:")


def _weights_uploaded() -> None:
    upload = st.session_state.get(WEIGHTS_UPLOAD_KEY)
    if upload is None:
        return
    suffix = Path(upload.name).suffix.lower()  # says how to read the file; the rest of the name is not used
    with tempfile.TemporaryDirectory(prefix="loupe-weights-") as tmp:
        path = Path(tmp) / f"weights{suffix}"
        path.write_bytes(upload.getbuffer())
        _install_weights(path, upload.name)


def _weights_path_given() -> None:
    text = str(st.session_state.get(WEIGHTS_PATH_KEY) or "").strip()
    if not text:
        st.session_state[WEIGHTS_NOTE_KEY] = ("error", "Type the path of the weights file first.")
        return
    try:
        check_data_path(text)  # a server with LOUPE_DATA_ROOTS reads nothing outside them, weights included
    except ValueError as exc:
        st.session_state[WEIGHTS_NOTE_KEY] = ("error", f"{exc}")
        return
    _install_weights(Path(text).expanduser(), text)


def _install_weights(path: Path, shown: str) -> None:
    """Install the weights file at `path` (named `shown` to the user) for the form's architecture; the outcome
    becomes the note shown under the control, and success ticks Pretrained (with fine_tune)."""
    arch = st.session_state["train_arch"]
    try:
        target = install_pretrained(arch, path)
    except FileNotFoundError:
        note = ("error", f"There is no file at `{shown}`.")
    except UnsafeWeightsError:
        note = ("error", (f"`{shown}` holds more than weights (Python objects that could run code when loaded), so "
                          "Loupe refused it. Use torchvision's own weights file, or save just the model's state_dict "
                          "(or a .safetensors file)."))
    except FileExistsError as exc:
        note = ("error", f"{exc}")
    except (OSError, ValueError) as exc:  # unreadable, not a state dict, or weights of another architecture
        note = ("error", f"`{shown}` cannot be used as the {arch} weights: {str(exc).replace(str(path), shown)}")
    else:
        st.session_state["train_pretrained"] = True
        match_schedule_to_weights()
        note = ("success", f"The {arch} weights are in place (`{target}`): *Pretrained* is ticked, with *fine_tune*.")
    st.session_state[WEIGHTS_NOTE_KEY] = note


def weights_hint(cfg: TrainConfig) -> None:
    model = cfg.model
    if model.pretrained and not model.weights_path:
        if not pretrained_available(model.arch):
            st.warning(
                f"The pretrained {model.arch} weights are not on this machine: the run downloads them, and "
                f"**fails if this machine is offline**. To work offline, give a weights file above, "
                "or untick *Pretrained* to train from scratch.",
                icon=":material/cloud_off:",
            )
    elif not model.pretrained and cfg.schedule == "fine_tune":
        st.info("Training from scratch: *one_cycle* fits better than *fine_tune*, whose frozen first phase "
                "only makes sense with pretrained weights.", icon=":material/lightbulb:")
