"""Serving Loupe to a team: the localhost bind, dataset roots that browsing cannot leave, and the login gate.

AppTest on the real app: LOUPE_DATA_ROOTS confines the Data page (typed paths, `..`, symlinks, remembered
folders) and Clean; with an [auth] section in the secrets a logged-out visitor gets the login page and
nothing else, a logged-in one the normal app with a Log out button.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import tomllib
import urllib.parse
import zipfile
from pathlib import Path

import pytest
from browser_support import streamlit_server
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from core import runs
from core.data import DataConfig
from core.demo import DemoSpec, make_demo_dataset
from core.env import allowed_data_roots, check_data_path, runs_dir, workspace_dir
from core.job import run_training
from core.model import ModelConfig
from core.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
PAGES = sorted(f"app_pages/{p.name}" for p in (REPO / "app_pages").glob("*.py"))
REFUSED = "outside the folders this server may read"
AUTH = {
    "redirect_uri": "http://localhost:8501/oauth2callback",
    "cookie_secret": "not-a-secret-only-a-test",
    "client_id": "loupe-test",
    "client_secret": "not-a-secret-either",
    "server_metadata_url": "https://login.example.com/.well-known/openid-configuration",
}


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def tree(tmp_path: Path, home: Path, write_image, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """allowed/bears and outside/bears (two classes of 4 images each), allowed/link -> outside/bears;
    LOUPE_DATA_ROOTS = allowed."""

    def bears(root: Path) -> Path:
        for k, name in enumerate(("grizzly", "teddy")):
            for i in range(4):
                write_image(root / name / f"{name}_{i}.png", colour=(90 * k, 120, 200 - 90 * k), size=16)
        return root

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    inside_set, outside_set = bears(allowed / "bears"), bears(outside / "bears")
    (allowed / "link").symlink_to(outside_set, target_is_directory=True)
    monkeypatch.setenv("LOUPE_DATA_ROOTS", str(allowed))
    return {"allowed": allowed, "inside": inside_set, "outside": outside_set, "link": allowed / "link"}


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=120)


def open_folder(at: AppTest, folder: Path | str) -> AppTest:
    at.text_input(key="data_path").input(str(folder))
    at.button(key="data_open").click()
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def recent_file() -> Path:
    return workspace_dir() / "recent.json"


# ---------------------------------------------------------------- core.env


def test_data_roots_unset_means_no_restriction(tmp_path, home, monkeypatch):
    monkeypatch.delenv("LOUPE_DATA_ROOTS", raising=False)
    assert allowed_data_roots() is None
    assert check_data_path(tmp_path / "anywhere" / ".." / "x") == (tmp_path / "x").resolve()


def test_check_data_path_resolves_before_comparing(tree, tmp_path, home, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("LOUPE_DATA_ROOTS", os.pathsep.join([str(tree["allowed"]), "", str(other)]))
    assert allowed_data_roots() == [tree["allowed"].resolve(), other.resolve()]
    assert check_data_path(tree["inside"]) == tree["inside"].resolve()
    assert check_data_path(other / "sub") == (other / "sub").resolve()
    assert check_data_path(workspace_dir() / "demo") == workspace_dir() / "demo"  # the workspace, always
    for escape in (tree["outside"], tree["link"], tree["link"] / "grizzly", tree["allowed"] / ".." / "outside"):
        with pytest.raises(ValueError, match=REFUSED) as refused:
            check_data_path(escape)
        assert str(tree["allowed"].resolve()) in str(refused.value)  # the message names what is allowed
    # A root is a folder, not a prefix: allowed-2 is not inside allowed.
    with pytest.raises(ValueError, match=REFUSED):
        check_data_path(Path(str(tree["allowed"]) + "-2"))


def test_data_roots_set_but_empty_leaves_only_the_workspace(tree, home, monkeypatch):
    monkeypatch.setenv("LOUPE_DATA_ROOTS", "")
    assert allowed_data_roots() == []
    with pytest.raises(ValueError, match=REFUSED):
        check_data_path(tree["inside"])
    assert check_data_path(workspace_dir() / "datasets" / "x") == workspace_dir() / "datasets" / "x"


# ---------------------------------------------------------------- the Data page


@pytest.mark.parametrize("where", ["outside", "link", "dotdot"])
def test_data_page_refuses_a_path_outside_the_roots(tree, where):
    typed = tree["allowed"] / ".." / "outside" / "bears" if where == "dotdot" else tree[where]
    at = app().run()
    open_folder(at, typed)
    assert REFUSED in errors(at)
    assert at.session_state["dataset"] is None
    assert not at.metric  # nothing was read: no image counts
    assert not recent_file().exists() or str(tree["outside"]) not in recent_file().read_text()


def test_data_page_refuses_without_saying_whether_an_outside_path_exists(tree):
    at = app().run()
    open_folder(at, tree["outside"].parent / "no-such-folder")
    assert REFUSED in errors(at)
    assert "There is no folder" not in errors(at)


def test_data_page_opens_a_folder_inside_the_roots(tree):
    at = app().run()
    open_folder(at, tree["inside"])
    assert not at.error
    assert at.session_state["dataset"] == str(tree["inside"].resolve())
    assert {m.label: m.value for m in at.metric}["Images"] == "8"


def test_remembered_folders_outside_the_roots_are_not_used(tree):
    recent_file().write_text(json.dumps([str(tree["outside"]), str(tree["inside"])]))
    at = app()
    at.session_state["dataset"] = str(tree["outside"])  # chosen before the roots were narrowed
    at.run()
    assert not at.exception, at.exception
    assert at.session_state["dataset"] == str(tree["inside"])
    assert at.selectbox(key="data_recent").options == [f"{tree['inside'].name}  ·  {tree['inside'].parent}"]

    recent_file().write_text(json.dumps([str(tree["outside"])]))
    at = app()
    at.session_state["dataset"] = str(tree["outside"])
    at.run()
    assert at.session_state["dataset"] is None
    assert "Data" in titles(at) and not at.metric
    assert any("No dataset yet" in m.value for m in at.sidebar.markdown)


@pytest.fixture(scope="module")
def outside_run(tmp_path_factory) -> dict[str, Path]:
    """A workspace with a finished run trained (as the CLI could) on a folder outside the allowed root."""
    base = tmp_path_factory.mktemp("serving-run")
    data = make_demo_dataset(base / "outside" / "shapes", DemoSpec(n_per_class=6, size=32, seed=1))
    cfg = TrainConfig(
        data=DataConfig(path=str(data), size=32, batch_size=8, num_workers=0, max_rotate=0, min_scale=0.75),
        model=ModelConfig(arch="resnet18", pretrained=False),
        schedule="one_cycle",
        epochs=1,
        lr=1e-2,
    )
    (base / "allowed").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_HOME", str(base / "workspace"))
        mp.delenv("LOUPE_DATA_ROOTS", raising=False)  # the CLI is not restricted
        run_dir = runs.create(cfg.to_dict(), root=runs_dir())
        assert run_training(run_dir) == 0
    return {"home": base / "workspace", "allowed": base / "allowed", "data": data, "run": run_dir}


def test_clean_refuses_a_run_whose_dataset_is_outside_the_roots(outside_run, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(outside_run["home"]))
    monkeypatch.setenv("LOUPE_DATA_ROOTS", str(outside_run["allowed"]))
    before = sorted(p.relative_to(outside_run["data"]) for p in outside_run["data"].rglob("*"))
    at = app().run()
    at.switch_page("app_pages/clean.py").run()
    assert not at.exception, at.exception
    assert "cannot be cleaned here" in errors(at) and REFUSED in errors(at)
    assert not [s for s in at.selectbox if s.key and s.key.startswith("clean_mark:")]
    assert sorted(p.relative_to(outside_run["data"]) for p in outside_run["data"].rglob("*")) == before


@pytest.mark.parametrize("page", ["app_pages/interpret.py", "app_pages/train.py"])
def test_no_page_shows_images_of_a_run_whose_dataset_is_outside_the_roots(outside_run, monkeypatch, page):
    """Interpret refuses the run as Clean does; every other page's images pass the same check one by one,
    so not one thumbnail of the outside folder is ever made."""
    monkeypatch.setenv("LOUPE_HOME", str(outside_run["home"]))
    monkeypatch.setenv("LOUPE_DATA_ROOTS", str(outside_run["allowed"]))
    thumbs = outside_run["home"] / "cache" / "thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)
    at = app().run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    if page == "app_pages/interpret.py":
        assert "cannot be shown here" in errors(at) and REFUSED in errors(at)
    assert not thumbs.exists() or not any(thumbs.iterdir())


# ---------------------------------------------------------------- the login gate


def logged_out(at: AppTest) -> AppTest:
    at.secrets["auth"] = dict(AUTH)
    at.user = {"is_logged_in": False}
    return at


def assert_login_page_only(at: AppTest, *secrets_in_view: str) -> None:
    assert not at.exception, at.exception
    assert titles(at) == ["Loupe"]
    assert [b.label for b in at.button] == ["Log in"]
    assert not (at.sidebar.markdown or at.sidebar.caption or at.sidebar.selectbox or at.sidebar.button)
    assert not (at.metric or at.text_input or at.file_uploader or at.selectbox or at.dataframe or at.tabs)
    shown = "\n".join(m.value for m in at.markdown)
    for text in secrets_in_view:
        assert text not in shown


def test_logged_out_visitor_gets_the_login_page_only(outside_run, monkeypatch):
    monkeypatch.setenv("LOUPE_HOME", str(outside_run["home"]))
    recent_file().write_text(json.dumps([str(outside_run["data"])]))
    at = logged_out(app())
    at.session_state["dataset"] = str(outside_run["data"])
    at.run()
    assert_login_page_only(at, outside_run["run"].name, outside_run["data"].name)
    # No other page is registered: switching to one is impossible.
    for page in PAGES:
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(page)


@pytest.mark.parametrize("page", PAGES)
def test_a_deep_link_while_logged_out_shows_the_login_page(outside_run, monkeypatch, page):
    """A first request for /train, /clean... (the page's file name before any run) lands on the login page."""
    monkeypatch.setenv("LOUPE_HOME", str(outside_run["home"]))
    at = logged_out(app())
    at.switch_page(page).run()
    assert_login_page_only(at, outside_run["run"].name, outside_run["data"].name)


def test_log_in_without_a_working_provider_says_why(home):
    at = logged_out(app()).run()
    at.button(key="auth_login_default").click().run()
    assert not at.exception, at.exception
    assert "Login is configured but cannot start" in errors(at)
    assert titles(at) == ["Loupe"]


def test_one_login_button_per_named_provider(home):
    at = app()
    at.secrets["auth"] = {**{k: AUTH[k] for k in ("redirect_uri", "cookie_secret")},
                          "google": {k: AUTH[k] for k in ("client_id", "client_secret", "server_metadata_url")},
                          "okta": {k: AUTH[k] for k in ("client_id", "client_secret", "server_metadata_url")}}
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception, at.exception
    assert [b.label for b in at.button] == ["Log in with google", "Log in with okta"]


def test_a_missing_login_flag_counts_as_logged_out(home):
    at = app()
    at.secrets["auth"] = dict(AUTH)  # at.user keeps AppTest's default: an email, no is_logged_in
    at.run()
    assert titles(at) == ["Loupe"] and "Data" not in titles(at)


def test_logged_in_user_gets_the_app_and_can_log_out(tree):
    at = app()
    at.secrets["auth"] = dict(AUTH)
    at.user = {"is_logged_in": True, "name": "Ada Lovelace", "email": "ada@example.com"}
    at.run()
    assert not at.exception, at.exception
    assert titles(at) == ["Data"]
    assert any("Ada Lovelace · ada@example.com" in m.value for m in at.sidebar.markdown)
    open_folder(at, tree["inside"])
    assert {m.label: m.value for m in at.metric}["Images"] == "8"
    at.switch_page("app_pages/train.py").run()
    assert not at.exception, at.exception
    assert titles(at) == ["Train"]

    at.button(key="auth_logout").click().run()
    assert not at.exception, at.exception
    assert at.user == {"is_logged_in": False}
    assert_login_page_only(at, tree["inside"].name)


def test_without_auth_the_app_is_as_before(home):
    at = app().run()
    assert not at.exception, at.exception
    assert titles(at) == ["Data"]
    assert not [b for b in at.button if b.key in ("auth_logout", "auth_login_default")]


# ---------------------------------------------------------------- .streamlit/config.toml


def test_config_binds_to_localhost_with_xsrf_and_cors_on():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    assert config["server"]["allowedHosts"] == ["localhost", "127.0.0.1", "::1"]  # no rebinding (see below)
    assert config["server"]["maxUploadSize"] <= 1024  # MB per file, all held in memory by Streamlit
    assert config["server"]["enableXsrfProtection"] is True
    assert config["server"]["enableCORS"] is True
    assert config["browser"]["gatherUsageStats"] is False


def test_secrets_file_is_never_committed():
    assert ".streamlit/secrets.toml" in (REPO / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------- the real server (.streamlit/config.toml in force)


def websocket_handshake(base_url: str, host: str) -> int:
    """The HTTP status of a websocket upgrade to Streamlit's /_stcore/stream with this Host header and a matching
    Origin, as a page served from `host` would send it (a DNS-rebinding page does exactly this): 101 is accepted."""
    port = urllib.parse.urlparse(base_url).port
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: http://{host}:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: streamlit\r\n\r\n"
    )
    with socket.create_connection(("localhost", port), timeout=20) as conn:
        conn.sendall(request.encode())
        status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_the_server_refuses_a_websocket_for_a_foreign_host_name(home):
    """DNS rebinding: a page on rebind.attacker.example whose name now resolves to 127.0.0.1 talks to Loupe with
    that Host (and a matching Origin); only the local names may open a session."""
    home.mkdir(parents=True)
    with streamlit_server(home) as url:
        assert websocket_handshake(url, "localhost") == 101
        assert websocket_handshake(url, "127.0.0.1") == 101
        assert websocket_handshake(url, "[::1]") == 101
        assert websocket_handshake(url, "rebind.attacker.example") == 403
        assert websocket_handshake(url, "localhost.attacker.example") == 403


def test_a_zip_over_the_upload_limit_is_refused_before_it_is_unpacked(home):
    """The Data page checks an upload's size against server.maxUploadSize before reading it (the real limit is
    1 GB; here it is lowered to 1 MB so the test needs no gigabyte)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for label in ("a", "b"):
            zf.writestr(f"{label}/big.png", os.urandom(700_000))
    limit = st_config.get_option("server.maxUploadSize")
    st_config.set_option("server.maxUploadSize", 1)
    try:
        at = app().run()
        at.file_uploader(key="data_zip").set_value(("big.zip", buffer.getvalue(), "application/zip"))
        at.run()
        assert not at.exception, at.exception
        assert "over the 1 MB this server accepts" in errors(at)
        assert not [b for b in at.button if b.key == "data_unpack"]
    finally:
        st_config.set_option("server.maxUploadSize", limit)
    assert not (workspace_dir() / "datasets").exists()
