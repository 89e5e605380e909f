"""Streamlit helpers shared by the pages: session state, the sidebar, cached loaders, charts, galleries.

Pages stay short scripts; anything two pages need lives here. Heavy work still belongs in core/.
"""
