"""Login with Streamlit's st.login (OIDC), on when .streamlit/secrets.toml has an [auth] section.

With no [auth] section Loupe is the single-user local app and none of this shows. With one, a visitor
who is not logged in gets only the login page: app.py builds the navigation from that page alone, so no
page that reads folders, trains, cleans or predicts exists for them, not even by URL.
"""

from __future__ import annotations

from collections.abc import Mapping

import streamlit as st
from streamlit.errors import StreamlitAuthError


def auth_section() -> Mapping | None:
    """The [auth] section of st.secrets, or None when there is none (or no secrets file at all)."""
    try:
        section = st.secrets.get("auth")
    except FileNotFoundError:  # st.secrets raises this when there is no secrets.toml
        return None
    return section if isinstance(section, Mapping) else None


def auth_configured() -> bool:
    return auth_section() is not None


def logged_in() -> bool:
    """Whether st.user is a logged-in identity; anything else (a missing flag included) counts as logged out."""
    return st.user.get("is_logged_in") is True


def providers() -> list[str | None]:
    """st.login's provider names: the [auth.<name>] subsections, or [None] (the default) when there are none."""
    section = auth_section() or {}
    named = [name for name, value in section.items() if isinstance(value, Mapping)]
    return named or [None]


def login_page() -> None:
    """The only page a logged-out visitor can reach."""
    st.title("Loupe")
    st.markdown("This Loupe is shared with a team: log in to see its datasets, runs and models.")
    for provider in providers():
        label = "Log in" if provider is None else f"Log in with {provider}"
        if st.button(label, key=f"auth_login_{provider or 'default'}", type="primary", icon=":material/login:"):
            try:
                st.login(provider)
            except StreamlitAuthError as e:  # e.g. Authlib missing or an incomplete [auth] section
                st.error(f"Login is configured but cannot start: {e}", icon=":material/error:")


def render_account() -> None:
    """The logged-in user and a Log out button, in the sidebar; nothing when login is not configured."""
    if not auth_configured():
        return
    with st.sidebar:
        st.caption("Signed in")
        name, email = st.user.get("name"), st.user.get("email")
        who = f"{name} · {email}" if name and email else name or email or "signed in"
        st.markdown(f":material/account_circle: {who}")
        # A callback: the logout takes effect before the script reruns, so the page is not drawn once more.
        st.button("Log out", key="auth_logout", on_click=st.logout, icon=":material/logout:")
