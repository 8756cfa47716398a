"""Take the README's screenshots of the MLflow UI (a docs tool, not part of pfl).

What it does
------------
Given a running MLflow server and the name of an experiment that holds pfl runs
(e.g. one ``pfl sweep``), it drives a headless Chromium with Playwright's sync API
and writes three PNGs next to this file (or under ``--out-dir``):

* ``mlflow_runs_table.png`` -- the experiment's runs table with every parent run
  expanded (the launch run of a ``pfl train``/``pfl sweep``, e.g. ``sweep-...``, its
  FL runs, and under each FL run its ``aph-...``/``loraph-...`` head runs), oldest
  first, with the columns ``test/f_ece`` (first), ``test/acc``, ``test/nll``, ...
  and the params ``alpha``, ``join_ratio``, ``method`` and the tag ``pfl.kind``.
  (MLflow nests child runs only when the table is sorted by start time, so it is
  not sorted by a metric);
* ``mlflow_head_run.png`` -- the page of one APH head run (name ``aph-...``): its
  description (the ``mlflow.note.content`` tag, rendered as Markdown), params and
  metrics;
* ``mlflow_fl_run.png`` -- the page of the FL run that APH run was fitted on.

The table's layout (visible columns, column widths, expanded rows, the closed
MLflow Assistant panel, the "Model training" workflow) is seeded into the page's
``localStorage`` before the MLflow app loads; the key names and shapes are those of
MLflow 3.x's UI (checked with MLflow 3.17.2), so another MLflow version may need
them adjusted. The sort order is set by the runs page's URL search params
(``orderByKey``, ``orderByAsc``). The run ids come from the server's REST API.

How to run
----------
It needs: a running MLflow server (``--url``) whose tracking store has the runs and
can serve their artifacts, an experiment name (``--experiment``), and Playwright
for Python with a Chromium executable (``--chromium``; e.g. Debian's ``chromium``,
no ``playwright install`` needed). Keep Playwright out of pfl's environment::

    python3 -m venv /tmp/pwvenv && /tmp/pwvenv/bin/pip install playwright
    cd /tmp/shots && mlflow server --backend-store-uri sqlite:///mlflow.db --port 5055 &
    /tmp/pwvenv/bin/python docs/screenshots.py --url http://127.0.0.1:5055 \\
        --experiment pfl --chromium /usr/bin/chromium

The script only reads from the server (REST ``GET``/``search`` calls and page views).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

# Columns shown in the runs table besides "Run Name", "Created" and "Duration" (which
# MLflow always shows): its column keys are "<group>.`<name>`", group one of
# attributes/metrics/params/tags.
METRIC_COLUMNS = ["test/f_ece", "test/acc", "test/nll", "test/ece_mean", "test/global_ece"]
PARAM_COLUMNS = ["alpha", "join_ratio", "method"]
TAG_COLUMNS = ["pfl.kind"]
RUN_NAME_COLUMN = "attributes.`Run Name`"
RUN_NAME_WIDTH = 390  # px: wide enough for "sweep-fedfomo-cifar10-dir0.1,0.5-jr0.2,0.5-cnn-r3-s0"
METRIC_WIDTH = 120  # px: room for a few more digits


def _api(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """GET (or POST ``body`` to) ``url/api/2.0/mlflow/<endpoint>`` and return the JSON."""
    full = f"{url.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    if query:
        full += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def find_runs(url: str, experiment: str) -> tuple[str, list[dict]]:
    """The experiment's id and all its active runs (as MLflow REST run dicts)."""
    exp = _api(url, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
        if token:
            body["page_token"] = token
        page = _api(url, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return exp["experiment_id"], runs


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _col(group: str, name: str) -> str:
    return f"{group}.`{name}`"


def _seed_storage(page: Page, experiment_id: str, state: dict | None = None) -> None:
    """Before any script of the app runs, preset MLflow UI state in localStorage."""
    entries = {
        "mlflow.workflowType_v1": "machine_learning",  # "Model training", not "GenAI"
        "mlflow.assistant.panelOpen_v1": False,  # keep the Assistant side panel closed
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    }
    if state is not None:  # the runs page's view state (columns, expanded rows, ...)
        key = f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState'
        entries[key] = state
    script = "".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
        for k, v in entries.items()
    )
    page.add_init_script(script)


def _wait_for_text(page: Page, text: str, timeout_ms: int) -> None:
    page.get_by_text(text, exact=True).first.wait_for(state="visible", timeout=timeout_ms)


# The viewport height at which the runs grid just fits its rows (the grid fills the
# height between the toolbar and the "N matching runs" footer).
_TABLE_HEIGHT_JS = """() => {
  const rows = [...document.querySelectorAll('.ag-row')];
  const grid = document.querySelector('.ag-root-wrapper');
  if (!rows.length || !grid) return 0;
  const last = Math.max(...rows.map(row => row.getBoundingClientRect().bottom));
  return Math.ceil(last + (window.innerHeight - grid.getBoundingClientRect().bottom) + 24);
}"""


def shoot_runs_table(page: Page, url: str, experiment_id: str, runs: list[dict],
                     out: Path, timeout_ms: int) -> None:
    parents = {_tags(r).get("mlflow.parentRunId") for r in runs} - {None}
    columns = (
        [_col("metrics", m) for m in METRIC_COLUMNS]
        + [_col("params", p) for p in PARAM_COLUMNS]
        + [_col("tags", t) for t in TAG_COLUMNS]
    )
    state = {
        "selectedColumns": columns,
        # the UI applies saved widths only to the columns named in columnOrder
        "columnOrder": [RUN_NAME_COLUMN, "runDateAndNestInfo", "duration", *columns],
        "columnWidths": {RUN_NAME_COLUMN: RUN_NAME_WIDTH,
                         **{_col("metrics", m): METRIC_WIDTH for m in METRIC_COLUMNS}},
        "runsExpanded": {run_id: True for run_id in parents},
        "runsHiddenMode": "SHOW_ALL",
    }
    _seed_storage(page, experiment_id, state)
    # MLflow nests child runs under their parents only when the table is sorted by
    # start time ("Created"); oldest first lists a sweep in the order it ran.
    query = urllib.parse.urlencode({
        "workflowType": "machine_learning",
        "orderByKey": "attributes.start_time",
        "orderByAsc": "true",
    })
    page.goto(f"{url}/#/experiments/{experiment_id}/runs?{query}")
    # a head run (nested two levels deep) is only listed once its parents are expanded
    heads = [r for r in runs if _tags(r).get("pfl.kind") == "heads"] or runs
    _wait_for_text(page, heads[0]["info"]["run_name"], timeout_ms)
    page.get_by_label("Toggle sidebar").click()  # fold the navigation: room for columns
    page.wait_for_timeout(1500)  # let the grid settle (column sizing, row heights)
    height = page.evaluate(_TABLE_HEIGHT_JS)  # trim the blank space below the rows
    if height and height < page.viewport_size["height"]:
        page.set_viewport_size({"width": page.viewport_size["width"], "height": height})
        page.wait_for_timeout(500)
    page.screenshot(path=str(out))


# Unfold the scroll boxes nested in the page's scroll box (the params table has a
# fixed height) and return how much taller the page's box is than its view: growing
# the viewport by that much lets one screenshot show the whole run page.
_UNFOLD_JS = """() => {
  const boxes = [...document.querySelectorAll('*')].filter(el =>
    el.scrollHeight > el.clientHeight + 1
    && ['auto', 'scroll'].includes(getComputedStyle(el).overflowY));
  const outer = boxes.filter(el => !boxes.some(other => other !== el && other.contains(el)));
  outer.forEach(el => el.setAttribute('data-screenshot-page', ''));
  for (const box of boxes) {
    if (outer.includes(box)) continue;
    // the box and its ancestors up to the page's box may cap its height
    for (let el = box; el && !outer.includes(el); el = el.parentElement) {
      el.style.setProperty('height', 'auto', 'important');
      el.style.setProperty('max-height', 'none', 'important');
      el.style.setProperty('overflow', 'visible', 'important');
    }
  }
  return Math.max(0, ...outer.map(el => el.scrollHeight - el.clientHeight));
}"""


# The bottom (px) of the lowest text in the page's box.
_CONTENT_BOTTOM_JS = """() => {
  let bottom = 0;
  for (const page of document.querySelectorAll('[data-screenshot-page]')) {
    for (const el of page.querySelectorAll('*')) {
      const rect = el.getBoundingClientRect();
      if (el.childElementCount === 0 && el.textContent.trim() && rect.height > 0) {
        bottom = Math.max(bottom, rect.bottom);
      }
    }
  }
  return Math.ceil(bottom);
}"""


def shoot_run_page(page: Page, url: str, experiment_id: str, run: dict, out: Path,
                   timeout_ms: int) -> None:
    _seed_storage(page, experiment_id)
    page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run['info']['run_id']}"
              "?workflowType=machine_learning")
    _wait_for_text(page, run["info"]["run_name"], timeout_ms)
    show_more = page.get_by_text("Show more", exact=True)  # the folded description
    if show_more.count():
        show_more.first.click()
    page.wait_for_timeout(1000)
    for _ in range(3):  # growing the viewport can re-layout the page
        extra = page.evaluate(_UNFOLD_JS)
        if extra <= 0:
            break
        size = page.viewport_size
        page.set_viewport_size({"width": size["width"], "height": size["height"] + extra})
        page.wait_for_timeout(500)
    bottom = page.evaluate(_CONTENT_BOTTOM_JS)  # trim the blank space below the content
    if bottom:
        page.set_viewport_size({"width": page.viewport_size["width"], "height": bottom + 40})
        page.wait_for_timeout(500)
    page.screenshot(path=str(out), full_page=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:5055", help="MLflow server URL")
    ap.add_argument("--experiment", default="pfl", help="experiment name")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--table-width", type=int, default=1800, help="px, runs table page")
    ap.add_argument("--page-width", type=int, default=1800, help="px, run pages")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per page")
    args = ap.parse_args(argv)
    url, timeout_ms = args.url.rstrip("/"), int(args.timeout * 1000)

    experiment_id, runs = find_runs(url, args.experiment)
    aph = sorted((r for r in runs if r["info"]["run_name"].startswith("aph-")),
                 key=lambda r: r["info"]["run_name"])
    if not aph:
        sys.exit(f"no APH head run (name aph-...) in experiment {args.experiment!r}")
    head = aph[0]
    fl_id = _tags(head).get("mlflow.parentRunId")
    fl = next((r for r in runs if r["info"]["run_id"] == fl_id), None)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        # the table's rows must all fit at first (the grid renders the visible rows
        # only); the page is cut down to them afterwards
        table_height = max(1000, 400 + 40 * len(runs))
        shots = [("mlflow_runs_table.png", args.table_width, table_height,
                  lambda page, out: shoot_runs_table(page, url, experiment_id, runs, out,
                                                     timeout_ms))]
        shots.append(("mlflow_head_run.png", args.page_width, 1000,
                      lambda page, out: shoot_run_page(page, url, experiment_id, head, out,
                                                       timeout_ms)))
        if fl is not None:
            shots.append(("mlflow_fl_run.png", args.page_width, 1000,
                          lambda page, out: shoot_run_page(page, url, experiment_id, fl, out,
                                                           timeout_ms)))
        for name, width, height, shoot in shots:
            # a fresh context (so fresh localStorage) for each page
            context = browser.new_context(viewport={"width": width, "height": height})
            out = args.out_dir / name
            shoot(context.new_page(), out)
            context.close()
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
