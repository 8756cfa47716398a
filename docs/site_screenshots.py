"""Take the screenshots of the documentation site checked in under ``docs/img/`` (a docs tool, not part of pfl).

It serves a built site (``make docs`` writes ``site/``) on 127.0.0.1 and drives headless Chromium with Playwright's
sync API to capture the top of three pages, 1280 x 1000 pixels each:

* ``site_home.png``: the home page (``index.html``);
* ``site_guide_heads.png``: one system guide (``guides/heads/``);
* ``site_config_reference.png``: the generated config reference (``reference/config/``).

It needs Playwright for Python and a Chromium executable (Debian's ``chromium``; no ``playwright install``). Keep
Playwright out of pfl's environment::

    make docs
    python3 -m venv /tmp/pwvenv && /tmp/pwvenv/bin/pip install playwright
    /tmp/pwvenv/bin/python docs/site_screenshots.py --site site --chromium /usr/bin/chromium

The flags Chromium starts with keep it off the network (this machine has none) and out of a sandbox it cannot
create as root.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

PAGES = {"site_home.png": "", "site_guide_heads.png": "guides/heads/",
         "site_config_reference.png": "reference/config/"}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``site`` on a free loopback port, serving in a daemon thread."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, default=Path("site"), help="the built site (default: site)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "img")
    args = parser.parse_args()
    if not (args.site / "index.html").is_file():
        raise SystemExit(f"no built site at {args.site}: run `make docs` first")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    server = serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            for name, path in PAGES.items():
                page.goto(base + path, wait_until="networkidle")
                page.screenshot(path=str(args.out_dir / name))
                print(args.out_dir / name)
            browser.close()
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
