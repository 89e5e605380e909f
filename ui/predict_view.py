"""The Predict page's pieces: classify uploads (cached per model version and image), charts, feedback, the
results table."""

import base64
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.bundle import BundleMeta, predict_probs
from core.env import runs_dir
from core.feedback import BadUpload, preview_jpeg, read_image, save_feedback
from core.rundir import RunDir
from core.runlist import RunInfo
from core.tta import predict_probs_tta
from ui.cache import run_bundle
from ui.gallery import passed_over
from ui.heatmaps import TOGGLE_HELP, upload_overlay
from ui.state import current_run, set_run

MODEL_KEY = "predict_model"
FOLLOWED_KEY = "predict_followed_run"
SAVED_KEY = "predict_saved"  # {image digest[:16]: label it was saved under}
BAR_COLOUR, MUTED_COLOUR = "#3b5bdb", "#adb5bd"


@st.cache_data(max_entries=1024, show_spinner=False)
def classify(run_dir: str, bundle_mtime: float, digest: str, _data: bytes, tta: bool = False) -> dict:
    """Check one upload by its content and predict it (with test-time augmentation: core.tta); cached per model
    file version, image content and `tta`."""
    bundle = run_bundle(Path(run_dir))
    try:
        upload = read_image(_data, min_side=max(2 * bundle.meta.size, 256))
    except BadUpload as e:
        return {"error": str(e)}
    return {
        "probs": (predict_probs_tta if tta else predict_probs)(bundle, [upload.image])[0].tolist(),
        "preview": preview_jpeg(upload.image, 384),
        "thumb": preview_jpeg(upload.image, 96, quality=75),
        "pixels": f"{upload.width}x{upload.height}",
    }


def ranked(meta: BundleMeta, result: dict) -> list[tuple[str, float]]:
    return sorted(zip(meta.vocab, result["probs"]), key=lambda pair: pair[1], reverse=True)


def answer(meta: BundleMeta, result: dict) -> tuple[str, float]:
    """The model's answer and its probability: the top class, or (multi-label) every class above the threshold."""
    pairs = ranked(meta, result)
    if meta.task != "multi_label":
        return pairs[0]
    above = [label for label, p in pairs if p > meta.threshold]
    return (" ".join(above) if above else "(none)"), pairs[0][1]


def top_figure(pairs: list[tuple[str, float]], threshold: float | None) -> go.Figure:
    """Horizontal bars, most probable on top; a multi-label model's decision threshold is drawn."""
    labels, probs = [p[0] for p in pairs], [p[1] for p in pairs]
    colours = [BAR_COLOUR if threshold is None or p > threshold else MUTED_COLOUR for p in probs]
    fig = go.Figure(go.Bar(x=probs, y=labels, orientation="h", marker_color=colours,
                           text=[f"{p:.1%}" for p in probs], textposition="outside", cliponaxis=False,
                           hovertemplate="%{y}: %{x:.2%}<extra></extra>"))
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#868e96",
                      annotation_text=f"threshold {threshold:.0%}", annotation_position="top")
    fig.update_xaxes(range=[0, 1.15], tickformat=".0%", title_text="probability")
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_layout(height=110 + 34 * len(labels), margin={"l": 10, "r": 10, "t": 30, "b": 10}, showlegend=False)
    return fig


def model_label(info: RunInfo) -> str:
    # a select box shows plain text: the summary's markdown code marks would show as backticks
    return f"{info.id} · {info.config.summary().replace('`', '')}" if info.config else info.id


def follow_current_run(model_ids: list[str]) -> None:
    """Default to the sidebar's run when it has a model; keep the last choice (else the newest model) when it has
    none, and say so: a failed newest run must not look like the model in use."""
    current = current_run()
    if current is not None and current.name in model_ids and st.session_state.get(FOLLOWED_KEY) != current.name:
        st.session_state[MODEL_KEY] = st.session_state[FOLLOWED_KEY] = current.name
    if st.session_state.get(MODEL_KEY) not in model_ids:
        st.session_state[MODEL_KEY] = model_ids[0]
    if current is not None and current.name not in model_ids:
        passed_over(current, current.parent / st.session_state[MODEL_KEY])


def pick_model() -> None:
    """Choosing a model here makes its run the current one, so the sidebar and other pages follow."""
    set_run(st.session_state[MODEL_KEY])
    st.session_state[FOLLOWED_KEY] = st.session_state[MODEL_KEY]


def show_one(meta: BundleMeta, result: dict, top_k: int, run_id: str) -> None:
    """One image up close: the image, the answer, the top-k chart, and the feedback form."""
    pairs = ranked(meta, result)
    label, prob = answer(meta, result)
    multi = meta.task == "multi_label"
    left, right = st.columns([1, 2], gap="large")
    with left:
        image = result["preview"]
        if st.toggle("Show heatmap", key="predict_heatmap", help=TOGGLE_HELP):  # the predicted class's Grad-CAM
            bundle_file = RunDir(runs_dir() / run_id).bundle
            image = upload_overlay(str(bundle_file.parent), bundle_file.stat().st_mtime, result["digest"],
                                   result["data"]) or image
        st.image(image, caption=f"{result['name']} · {result['pixels']}", width="stretch")
    with right:
        if multi:
            st.markdown(f"#### {label}" if label != "(none)" else "#### No label above the threshold")
        else:
            st.markdown(f"#### {label} · {prob:.1%}")
        st.plotly_chart(top_figure(pairs[:top_k], meta.threshold if multi else None), key="predict_chart",
                        config={"displayModeBar": False})
        feedback_form(meta, result, label, pairs, run_id)


def feedback_form(meta: BundleMeta, result: dict, predicted: str, pairs: list[tuple[str, float]], run_id: str) -> None:
    key = result["digest"]
    saved = st.session_state.setdefault(SAVED_KEY, {})
    if key in saved:
        st.success(f"Saved as feedback: the right label is **{saved[key]}**.", icon=":material/check:")
    with st.expander("This is wrong", icon=":material/flag:"):
        runner_up = meta.vocab.index(pairs[1][0]) if len(pairs) > 1 else 0
        with st.form(key=f"predict_fb_form_{key}", border=False):
            label = st.selectbox("The right label", meta.vocab, index=runner_up, key=f"predict_fb_label_{key}",
                                 accept_new_options=True, help="Pick a class, or type a new one.")
            submitted = st.form_submit_button("Save as feedback", key=f"predict_fb_save_{key}", icon=":material/save:")
        st.caption("The image is kept in the feedback dataset under the right label; "
                   "a later run can add it to its training data.")
    if submitted:
        try:
            path = save_feedback(result["data"], result["name"], predicted, label or "", run_id)
        except (ValueError, OSError) as e:  # BadUpload is a ValueError
            st.error(f"Not saved: {e}")
            return
        saved[key] = path.parent.name
        st.rerun()


def results_table(meta: BundleMeta, results: list[dict], top_k: int) -> pd.DataFrame:
    rows = []
    for r in results:
        label, prob = answer(meta, r)
        rows.append({
            "image": "data:image/jpeg;base64," + base64.b64encode(r["thumb"]).decode(),
            "file": r["name"],
            "prediction": label,
            "probability": prob,
            f"top {top_k}": " · ".join(f"{lbl} {p:.0%}" for lbl, p in ranked(meta, r)[:top_k]),
        })
    return pd.DataFrame(rows)
