"""The documentation stays true to the code.

* The generated reference (:mod:`pfl.reference`) names every registered algorithm, dataset, architecture, config key
  and metric; every config key and algorithm knob has a docstring; every algorithm has its section in
  ``docs/algorithms.md``; every metric a real tracked run logs is in the vocabulary.
* Every ```` ```bash ```` block of ``docs/`` runs, page by page in order, in a scratch folder on the real data slices,
  unless the line before it is ``<!-- not-run: REASON -->`` (a GPU, a server, a run id, or over a minute here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pfl import tracking
from pfl.algorithms import REGISTRY
from pfl.config import HeadConfig, RunConfig, load_config
from pfl.data.datasets import CATALOG
from pfl.models import ARCHITECTURES
from pfl.reference import pages
from pfl.train import run_training
from pfl.vocabulary import METRICS, QUALITY, documented

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```bash\n(?P<body>.*?)\n```", re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*\S.*-->")
# data fixtures (tests/conftest.py) a page's commands may read, by the dataset names that call for them
FIXTURES = {"data_dir": (), "david_dir": ("david", "vp_"), "cinic10_dir": ("cinic",), "agnews_dir": ("agnews",),
            "speech_commands_dir": ("speech",), "tinyimagenet_dir": ("tinyimagenet",)}


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return pages()


def test_the_reference_names_every_algorithm_dataset_architecture_config_key_and_metric(reference):
    algorithms, catalog = reference["reference/algorithms.md"], reference["reference/catalog.md"]
    config, metrics = reference["reference/config.md"], reference["reference/metrics.md"]
    assert [name for name in REGISTRY if f"\n## {name}\n" not in algorithms] == []
    for name, cls in REGISTRY.items():
        section = algorithms.split(f"\n## {name}\n")[1].split("\n## ")[0]
        assert [k for k in cls.Params.model_fields if f"| `{k}` |" not in section] == [], name
    assert [name for name in CATALOG if f"| `{name}` |" not in catalog] == []
    assert [name for name in ARCHITECTURES if f"| `{name}` |" not in catalog] == []
    keys = [*RunConfig.model_fields, *HeadConfig.model_fields]
    assert [k for k in keys if f"| `{k}` |" not in config] == []
    assert [m for m in (*QUALITY, *METRICS) if f"| `{m}` |" not in metrics] == []
    assert all(f"reference/api/{m}.md" in reference for m in ("pfl.config", "pfl.federated.engine", "reports.plots"))


def undocumented(models: dict[str, type]) -> list[str]:
    """``<label>.<field>`` of every field of ``models`` (label -> pydantic model) without a docstring."""
    return [f"{label}.{k}" for label, model in models.items() for k, f in model.model_fields.items()
            if not (f.description or "").strip()]


def test_every_config_key_and_algorithm_knob_has_a_docstring():
    models = {"RunConfig": RunConfig, "HeadConfig": HeadConfig,
              **{f"{name}.Params": cls.Params for name, cls in REGISTRY.items()}}
    assert undocumented(models) == [], "give each a docstring under its field (pydantic use_attribute_docstrings)"


def test_the_docstring_check_names_a_knob_without_one():
    """An algorithm's knobs read their attribute docstrings (HyperParams' config): a bare field is named."""
    from pfl.federated.base import HyperParams

    class Knobs(HyperParams):
        documented: int = 1
        """What it does."""
        bare: int = 2

    assert undocumented({"Knobs": Knobs}) == ["Knobs.bare"]


def test_every_algorithm_has_its_section_in_the_algorithms_page():
    text = (DOCS / "algorithms.md").read_text()
    headings = re.findall(r"^## `([a-z0-9_]+)`: ", text, re.M)
    assert [name for name in REGISTRY if name not in headings] == []
    assert [name for name in headings if name not in REGISTRY] == []


def test_every_metric_a_tracked_run_logs_is_in_the_vocabulary(cifar10_dir, tmp_path, monkeypatch):
    """A real tracked FL run (launch run, FL run with new-client evaluation) on the CIFAR-10 slice."""
    cfg = load_config(None, ["algo=fedavg", "num_clients=3", "join_ratio=1", "global_rounds=2", "batch_size=64",
                             "partition=dirichlet", "new_clients=1", "finetune_epochs=1", f"data_dir={cifar10_dir}",
                             f"cache_dir={tmp_path / 'cache'}", "num_threads=1", "device=cpu"])
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    try:
        tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run_training(cfg, progress=False)
        client = mlflow.MlflowClient()
        names = {m for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])
                 for m in run.data.metrics}
    finally:
        mlflow.set_tracking_uri(old)
    assert "test/acc" in names and "new/acc" in names and "time/round" in names
    assert sorted(n for n in names if documented(n) is None) == []


def bash_blocks(page: Path) -> list[tuple[str, bool]]:
    """The ```` ```bash ```` blocks of a Markdown page in order: (commands, whether the test runs them)."""
    return [(m["body"], not NOT_RUN.search(m["before"])) for m in FENCE.finditer("\n" + page.read_text())]


def _pages_with_commands() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if any(run for _, run in bash_blocks(p)))


def test_bash_blocks_are_found_and_marks_are_read(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Intro\n\n```bash\npfl --help\n```\n\n<!-- not-run: GPU -->\n```bash\npfl train x\n```\n")
    assert bash_blocks(page) == [("pfl --help", True), ("pfl train x", False)]


@pytest.mark.parametrize("page", _pages_with_commands(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_the_commands_of_a_docs_page_run(page, request, tmp_path):
    blocks = [body for body, run in bash_blocks(page) if run]
    data = tmp_path / "data"
    data.mkdir()
    for fixture, words in FIXTURES.items():  # the data the runnable commands name (a dataset, a config's file name)
        if fixture == "data_dir" or any(w in body for w in words for body in blocks):
            for entry in request.getfixturevalue(fixture).iterdir():
                if not (data / entry.name).exists():
                    (data / entry.name).symlink_to(entry)
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PFL_DATA_DIR": str(data), "PFL_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for body in blocks:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{page.name}: {body}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
