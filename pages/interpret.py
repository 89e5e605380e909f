"""Interpret page (being built)."""

import streamlit as st

st.title("Interpret")
st.info("This page is being built.")
