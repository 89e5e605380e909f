"""Loupe: build image classifiers the fast.ai way. Start it with `streamlit run app.py`."""

import streamlit as st

from ui.auth import auth_configured, logged_in, login_page, render_account
from ui.loading import run_page
from ui.sidebar import render_sidebar

# An emoji tab icon is drawn by the browser itself; a ":material/...:" one is fetched from Google's font server,
# which an offline machine cannot reach (a failed request on every page).
st.set_page_config(page_title="Loupe", page_icon="🔍", layout="wide")

DATA = st.Page("app_pages/data.py", title="Data", icon=":material/photo_library:", url_path="data")


def home() -> None:
    """The app's root URL opens Data at its own path, so /data works as a deep link like every other page
    (Streamlit serves a default page only at the root)."""
    st.switch_page(DATA)


pages = {
    "Data": [st.Page(home, title="Loupe", url_path="home", default=True, visibility="hidden"), DATA],
    "Train": [st.Page("app_pages/train.py", title="Train", icon=":material/model_training:")],
    "Analyse": [
        st.Page("app_pages/interpret.py", title="Interpret", icon=":material/insights:"),
        st.Page("app_pages/clean.py", title="Clean", icon=":material/cleaning_services:"),
    ],
    "Use": [
        st.Page("app_pages/predict.py", title="Predict", icon=":material/image_search:"),
        st.Page("app_pages/runs.py", title="Runs", icon=":material/history:"),
    ],
}
if auth_configured() and not logged_in():
    # The navigation holds the login page alone: no other page exists for this visitor, not even by URL.
    page = st.navigation([st.Page(login_page, title="Log in", icon=":material/login:")], position="hidden")
else:
    page = st.navigation(pages)
    render_sidebar()
    render_account()
run_page(page)
