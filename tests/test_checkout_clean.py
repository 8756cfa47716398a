"""The suite leaves the checkout as it found it (tests/conftest.py): each test runs in its own tmp_path, so the
artifacts of the SQLite stores it opens land there, and the session fails when the checkout gained files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow

from conftest import REPO, checkout_paths, written_into


def test_a_store_opened_by_a_test_keeps_its_artifacts_in_the_test_folder(tmp_path):
    """MLflow's default artifact root for a SQLite store is ``./mlruns``, resolved when the store is first opened:
    here the test's own folder, not the checkout the suite was started from."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("artifacts"))
    client.log_text(run.info.run_id, "x", "a.txt")
    artifacts = Path(client.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"))
    assert (artifacts / "a.txt").read_text() == "x"
    assert artifacts.is_relative_to(tmp_path) and not artifacts.is_relative_to(REPO)


def _touch(root: Path, *paths: str) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).touch()


def test_new_ignored_and_top_level_paths_are_what_a_test_wrote_into_the_checkout(tmp_path):
    root = tmp_path / "checkout"
    _touch(root, ".gitignore", "src/a.py", "mlruns/0/old/artifacts/m.bin", ".venv/pyvenv.cfg")
    (root / ".gitignore").write_text("mlruns/\n*.db\n.venv/\n")
    before = checkout_paths(root)
    assert "src/a.py" in before and "mlruns/0/old/artifacts/m.bin" in before and ".venv" not in before
    _touch(root, "mlruns/0/new/artifacts/m.bin", "mlruns/1/r/artifacts/c.json", "src/store.db", "top.txt",
           "src/new_module.py", "src/__pycache__/a.pyc", ".venv/lib/x.py")
    # outside a git checkout every new path counts, a new folder standing for its content
    assert written_into(root, before) == ["mlruns/0/new", "mlruns/1", "src/new_module.py", "src/store.db",
                                          "top.txt"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    assert written_into(root, checkout_paths(root)) == []  # git's own folder is not watched
    # in a git checkout, a new source file in its folders is someone's edit, not a test's output
    assert written_into(root, before) == ["mlruns/0/new", "mlruns/1", "src/store.db", "top.txt"]
