"""Loupe: build image classifiers the fast.ai way. Start with `streamlit run app.py`."""

import streamlit as st

st.set_page_config(page_title="Loupe", page_icon=":material/center_focus_strong:", layout="wide")
st.title("Loupe")
st.write(
    "Look at your images, fine-tune a pretrained CNN in a few epochs, let the model show you its worst "
    "mistakes, clean the labels, retrain, and use the model on new images."
)
st.info("The Data, Train, Interpret, Clean, Predict and Runs pages are being built.")
