"""Predict: a trained model on new images (uploads or a camera shot); wrong answers become a feedback dataset."""


import streamlit as st

from core.bundle import BundleError
from core.csvfile import predictions_csv
from core.env import runs_dir
from core.feedback import MAX_UPLOAD_BYTES, MAX_UPLOAD_MB, digest_of, feedback_counts, feedback_dir
from core.runlist import list_runs
from ui.cache import run_bundle, split_line
from ui.predict_view import (
    MODEL_KEY,
    classify,
    follow_current_run,
    model_label,
    pick_model,
    results_table,
    show_one,
)

st.title("Predict")
models = [info for info in list_runs(runs_dir()) if info.has_model() and info.config is not None]
if not models:
    st.info("No trained model yet: train one on **Train**; every finished run can then be used here.")
    st.stop()

by_id = {info.id: info for info in models}
follow_current_run(list(by_id))
run_id = st.selectbox("Model", list(by_id), key=MODEL_KEY, format_func=lambda i: model_label(by_id[i]),
                      on_change=pick_model)
run_dir = by_id[run_id].path
try:
    bundle = run_bundle(run_dir)
except (BundleError, OSError, ValueError, RuntimeError) as e:
    st.error(f"The model of run {run_id} cannot be loaded: {e}")
    st.stop()
meta = bundle.meta
multi = meta.task == "multi_label"
kind = f"multi-label (a label counts above {meta.threshold:.0%})" if multi else "one label per image"
split = split_line(run_dir, by_id[run_id].config)
st.caption(f"{len(meta.vocab)} classes: {', '.join(meta.vocab)} · {kind} · {meta.arch} at {meta.size} px"
           + (f" · {split}" if split else ""))

source_col, k_col = st.columns([3, 1])
source = source_col.radio("Images from", ["Files", "Camera"], key="predict_source", horizontal=True)
top_k = len(meta.vocab)
if len(meta.vocab) > 1:
    top_k = k_col.slider("Classes shown", 1, len(meta.vocab), min(5, len(meta.vocab)), key="predict_top_k")
tta = st.toggle("Test-time augmentation", key="predict_tta",
                help="Average the prediction over 4 augmented copies of each image (the training augmentation) and "
                "blend it with the plain one, as fastai's tta does: often a little more accurate, 5 times the work.")
if source == "Files":
    files = st.file_uploader(
        "Images to classify",
        # only filters the browser's file picker (each file is judged by its content below); .heic/.heif by
        # name too, for browsers that give HEIC photos no image/* type
        type=["image", ".heic", ".heif"],
        accept_multiple_files=True,
        key="predict_files",
        max_upload_size=MAX_UPLOAD_MB,
        help=f"JPEG, PNG, GIF, BMP, WebP, TIFF or HEIC, up to {MAX_UPLOAD_MB} MB each. "
        "Several at once give a table and a CSV.",
    )
else:
    shot = st.camera_input("Take a photo", key="predict_camera")
    files = [shot] if shot is not None else []

results, rejected = [], []
bundle_mtime = by_id[run_id].run.bundle.stat().st_mtime
with st.spinner(f"Classifying {len(files)} images…"):
    for f in files:
        if f.size > MAX_UPLOAD_BYTES:  # the browser enforces the limit too, but never trust the client
            too_big = f"the file is {f.size / 2**20:.1f} MB, over the {MAX_UPLOAD_MB} MB limit per image."
            rejected.append((f.name, too_big))
            continue
        data = f.getvalue()
        digest = digest_of(data)
        out = classify(str(run_dir), bundle_mtime, digest, data, tta)
        if "error" in out:
            rejected.append((f.name, out["error"]))
        else:
            results.append({"name": f.name, "data": data, "digest": digest[:16], **out})

for name, reason in rejected:
    st.error(f"**{name}** was not classified: {reason} Nothing was saved.", icon=":material/block:")

if len(results) == 1:
    show_one(meta, results[0], top_k, run_id)
elif results:
    table = results_table(meta, results, top_k)
    st.dataframe(
        table,
        hide_index=True,
        row_height=64,
        column_config={
            "image": st.column_config.ImageColumn("image", width="small"),
            "probability": st.column_config.ProgressColumn(
                "probability", min_value=0.0, max_value=1.0, format="percent",
                help="of the most probable class" if multi else None),
        },
    )
    csv = predictions_csv(meta.vocab, [r["probs"] for r in results], table)
    st.download_button("Download CSV", csv, file_name=f"predictions-{run_id}.csv",
                       mime="text/csv", key="predict_csv", icon=":material/download:", on_click="ignore")
    st.divider()
    pick = st.selectbox(
        "Look closer at one image", range(len(results)), key="predict_pick",
        format_func=lambda i: f"{table['file'][i]} → {table['prediction'][i]} ({table['probability'][i]:.0%})",
    )
    show_one(meta, results[pick], top_k, run_id)
elif not files:
    st.caption("Upload one image for a close look, or many for a table and a CSV of every prediction.")

counts = feedback_counts()
if counts:
    listed = ", ".join(f"{label} {n}" for label, n in counts.items())
    total = sum(counts.values())
    st.caption(f":material/inventory_2: Feedback dataset so far: {total} image{'s' if total != 1 else ''} ({listed}) "
               f"in `{feedback_dir()}`.")
