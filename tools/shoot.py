"""Screenshot pages of the running app, to look at them as a user would.

    python tools/shoot.py --home WORKSPACE --out DIR data train interpret ...

Pages are url paths ("" is the default page). Uses Debian's Chromium through Playwright.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser_support import CHROMIUM_ARGS, find_chromium, streamlit_server, wait_for_app  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("pages", nargs="+")
    p.add_argument("--home", type=Path, required=True, help="LOUPE_HOME for the app")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--width", type=int, default=1400)
    # Streamlit scrolls inside its own container, so a full-page shot is only as tall as the window.
    p.add_argument("--height", type=int, default=1800)
    p.add_argument("--settle", type=float, default=2.0, help="extra seconds after the script finishes")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.home.mkdir(parents=True, exist_ok=True)
    with streamlit_server(a.home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        for name in a.pages:
            page.goto(f"{url}/{name}")
            wait_for_app(page)
            time.sleep(a.settle)
            target = a.out / f"{name or 'home'}.png"
            page.screenshot(path=str(target), full_page=True)
            print(target)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
