"""Clean page (being built)."""

import streamlit as st

st.title("Clean")
st.info("This page is being built.")
