"""A shared tracking server, as several users and machines use it: PostgreSQL as MLflow's backend store and as
Optuna's storage, an ``mlflow server`` that proxies the artifacts, and the real ``pfl`` commands talking to it
over HTTP (README, "A shared tracking server").

The module starts Debian's PostgreSQL in a temporary folder (loopback only, a role with a password, databases
``mlflow`` and ``optuna``) and the .venv's ``mlflow server`` on it; it is skipped only where PostgreSQL or
psycopg2 is not installed. Then ``pfl train``, ``pfl heads``, two ``pfl tune`` workers on one study and ``pfl
report`` run as subprocesses with ``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``; the tune workers start
together with ``pfl train``, on a fresh ``optuna`` database (:func:`pfl.locking.store_lock` serializes Optuna's
table creation and the study's run list with an advisory lock; a test of its own checks that on fresh databases).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import mlflow
import optuna
import pytest

psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")


def _postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs: ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin`` (Debian); ``None`` when neither holds ``initdb``."""
    pg_config = shutil.which("pg_config")
    folders = [subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip()] \
        if pg_config else []
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    return next((Path(f) for f in folders if f and (Path(f) / "initdb").is_file()), None)


BINDIR = _postgres_bindir()
pytestmark = pytest.mark.skipif(BINDIR is None, reason="PostgreSQL is not installed (no initdb in pg_config "
                                                       "--bindir or /usr/lib/postgresql/*/bin)")
USER, PASSWORD = "pfl", "pfl-test-password"
FRESH = ("fresh1", "fresh2", "fresh3")  # empty databases for the store_lock test, one per simultaneous start
FRESH_MLFLOW = "fresh_mlflow"  # an empty database for two MLflow stores opened at once
STARTUP_S = 120  # PostgreSQL and the MLflow server each get this long to answer


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_command(program: str, *args: str) -> list[str]:
    """The command line of a PostgreSQL program from :data:`BINDIR`, run as the ``postgres`` OS user when we are
    root (PostgreSQL refuses to run as root)."""
    user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return [*user, str(BINDIR / program), *args]


def _run_postgres(program: str, *args: str) -> None:
    """Run :func:`_postgres_command`; fail the test with its output when it fails."""
    done = subprocess.run(_postgres_command(program, *args), capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{program} failed with status {done.returncode}: {done.stdout}{done.stderr}")


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL on 127.0.0.1 (its data and unix socket in a temporary folder), a role ``pfl`` with a
    password and its databases ``mlflow``, ``optuna`` and :data:`FRESH`; yields their SQLAlchemy URLs by database
    name, and stops the server (``pg_ctl stop -m fast``) and removes the folder at the end."""
    with ExitStack() as cleanup:
        root = Path(tempfile.mkdtemp(prefix="pfl-pg-"))  # short: a unix socket path has at most 107 bytes
        cleanup.callback(shutil.rmtree, root, ignore_errors=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        data, port = root / "data", _free_port()
        _run_postgres("initdb", "-D", str(data), "-U", "postgres", "--auth-local=trust",
                      "--auth-host=scram-sha-256", "--no-sync")
        cleanup.callback(subprocess.run, _postgres_command("pg_ctl", "stop", "-D", str(data), "-m", "fast"),
                         capture_output=True)
        _run_postgres("pg_ctl", "start", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", str(STARTUP_S),
                      "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off")
        admin = psycopg2.connect(host=str(root), port=port, user="postgres", dbname="postgres")
        admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            for name in ("mlflow", "optuna", *FRESH, FRESH_MLFLOW):
                cur.execute(f"CREATE DATABASE {name} OWNER {USER}")
        admin.close()
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; name the driver pfl's tests install
        yield {name: f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/{name}"
               for name in ("mlflow", "optuna", *FRESH, FRESH_MLFLOW)}


def _wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when the server exits or
    :data:`STARTUP_S` passes first."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    state = f"exited with status {server.returncode}" if server.poll() is not None else \
        f"did not answer {url} within {STARTUP_S} s"
    pytest.fail(f"mlflow server {state}; its log:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The .venv's ``mlflow server`` on the ``mlflow`` database, proxying artifacts into a temporary folder;
    yields its URI ``http://127.0.0.1:<port>`` and that folder, and stops the server's process group at the end."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    artifacts, log, port = folder / "artifacts", folder / "server.log", _free_port()
    # one worker and no job runner (MLflow's GenAI jobs, a dozen processes): a 6 s start on 2 cores, not 17 s
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                                   postgres["mlflow"], "--artifacts-destination", str(artifacts), "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_health(f"http://127.0.0.1:{port}/health", server, log)
        yield f"http://127.0.0.1:{port}", artifacts
    finally:  # the server's own SIGTERM handling leaves its children behind: stop the whole group
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _finish(process: subprocess.Popen, what: str) -> str:
    """Wait for a ``pfl`` subprocess; its output, after asserting that it succeeded."""
    out = process.communicate(timeout=600)[0]
    assert process.returncode == 0, f"{what} exited with status {process.returncode}:\n{out}"
    return out


def _printed_id(out: str, label: str) -> str:
    """The run id a ``pfl`` command printed on its ``<label>: <id> ...`` line."""
    return next(line.split()[len(label.split())] for line in out.splitlines() if line.startswith(label + ":"))


@pytest.fixture(scope="module")
def commands(tracking_server, postgres, cifar10_dir, tmp_path_factory) -> dict[str, str]:
    """Run the shared-server workflow as subprocesses against the server: two ``pfl tune`` workers on one
    PostgreSQL study started together with ``pfl train``, then ``pfl heads`` on the FL run, then ``pfl report``.

    Returns:
        the run ids the commands printed (``launch``, ``fl``, ``heads``), the working folder (``cwd``) and the
        seconds the commands took (``seconds``).
    """
    uri, _ = tracking_server
    cwd = tmp_path_factory.mktemp("workflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    common = [f"data_dir={cifar10_dir}", f"cache_dir={cwd / 'cache'}", "num_clients=4", "classes_per_client=5",
              "join_ratio=0.5", "global_rounds=1", "device=cpu", "num_threads=1", "eval_batch_size=500"]

    def start(*args: str) -> subprocess.Popen:
        """Start ``pfl <args>`` against the server, its output piped."""
        return subprocess.Popen([sys.executable, "-m", "pfl.cli", *args], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    begin = time.perf_counter()
    tune = [start("tune", "--algo", "fedfomo", "--n-trials", "1", "--storage", postgres["optuna"], "--study",
                  "shared", "--out", str(cwd), "--no-progress", *common, "experiment=shared-tune") for _ in range(2)]
    try:
        trained = _finish(start("train", "--no-progress", *common, "algo=fedavg", "experiment=shared"), "pfl train")
        fl = _printed_id(trained, "FL run")
        heads = _finish(start("heads", "--run-id", fl, "--method", "aph", "--no-progress", "global_epoch=1",
                              "sampling_num=2", "ood_dataset=none"), "pfl heads")
        for worker in tune:
            _finish(worker, "pfl tune")
    finally:  # a failure above leaves no worker running against a server about to stop
        for worker in tune:
            worker.kill()
    _finish(start("report", "--experiment", "shared", "--out", str(cwd / "report")), "pfl report")
    return {"launch": _printed_id(trained, "launch run"), "fl": fl, "heads": _printed_id(heads, "head run"),
            "cwd": str(cwd), "seconds": f"{time.perf_counter() - begin:.1f}"}


def test_runs_live_in_the_server_with_their_hierarchy(tracking_server, commands):
    uri, _ = tracking_server
    client = mlflow.MlflowClient(uri)
    launch, fl, heads = (client.get_run(commands[k]) for k in ("launch", "fl", "heads"))
    assert {r.info.status for r in (launch, fl, heads)} == {"FINISHED"}
    assert [r.data.tags["pfl.kind"] for r in (launch, fl, heads)] == ["launch", "fl", "heads"]
    assert fl.data.tags["mlflow.parentRunId"] == launch.info.run_id
    assert heads.data.tags["mlflow.parentRunId"] == fl.info.run_id
    assert "test/acc" in fl.data.metrics and "wo/acc" in heads.data.metrics
    assert not (Path(commands["cwd"]) / "mlflow.db").exists()  # nothing fell back to the default SQLite store
    print(f"train, heads, 2 tune workers and report on the server: {commands['seconds']} s")


def test_artifacts_go_through_the_server(tracking_server, commands, tmp_path):
    from pfl import tracking
    from pfl.train import evaluate_client_model

    uri, artifacts = tracking_server
    fl = mlflow.MlflowClient(uri).get_run(commands["fl"])
    assert fl.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients never see the folder
    path = mlflow.artifacts.download_artifacts(run_id=commands["fl"], artifact_path="client_metrics.json",
                                               dst_path=str(tmp_path), tracking_uri=uri)
    logged = json.loads(Path(path).read_text())["clients"]
    assert len(logged) == 4
    (stored,) = artifacts.glob(f"*/{commands['fl']}/artifacts/client_metrics.json")  # <experiment>/<run>/artifacts
    assert stored.read_bytes() == Path(path).read_bytes()  # written by the server, in its destination
    old = mlflow.get_tracking_uri()
    try:
        tracking.configure_tracking(uri)
        assert not tracking.load_client_model(commands["fl"], client_id=1).training
        again = evaluate_client_model(commands["fl"], client_id=1)  # the model from the server scores as logged
    finally:
        mlflow.set_tracking_uri(old)
    assert again["acc"] == pytest.approx(logged[1]["acc"], abs=1e-9)
    assert again["nll"] == pytest.approx(logged[1]["nll"], abs=1e-6)


def test_two_tune_workers_share_one_postgresql_study(tracking_server, postgres, commands):
    uri, _ = tracking_server
    study = optuna.load_study(study_name="shared", storage=postgres["optuna"])
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("shared-tune").experiment_id
    study_runs = client.search_runs([experiment], "tags.`pfl.kind` = 'study'")
    assert len(study_runs) == 2 and {r.info.status for r in study_runs} == {"FINISHED"}
    assert sorted(study.user_attrs["mlflow_study_run_ids"]) == sorted(r.info.run_id for r in study_runs)
    trials = client.search_runs([experiment], "tags.`pfl.kind` = 'trial'")
    assert sorted(t.user_attrs["mlflow_run_id"] for t in study.trials) == sorted(r.info.run_id for r in trials)


def test_the_report_run_holds_its_table(tracking_server, commands, tmp_path):
    uri, _ = tracking_server
    client = mlflow.MlflowClient(uri)
    (report,) = client.search_runs([client.get_experiment_by_name("shared").experiment_id],
                                   "tags.`pfl.kind` = 'report'")
    assert report.info.status == "FINISHED"
    table = mlflow.artifacts.download_artifacts(run_id=report.info.run_id, artifact_path="table.md",
                                                dst_path=str(tmp_path), tracking_uri=uri)
    assert "FedAvg" in Path(table).read_text()
    assert (Path(commands["cwd"]) / "report" / "table.md").read_text() == Path(table).read_text()


# a worker for the test below: after its imports it says "ready", then per URL waits for a line on stdin, creates
# Optuna's storage under store_lock (printing when it held the lock) and appends its name to a study's list
_LOCKED_WORKER = """
import sys, time
import optuna
from pfl.locking import store_lock

optuna.logging.set_verbosity(optuna.logging.WARNING)
print("ready", flush=True)
for url in sys.argv[2:]:
    sys.stdin.readline()
    with store_lock(url):
        held = time.time()
        storage = optuna.storages.RDBStorage(url)
        released = time.time()
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    with store_lock(url):
        study.set_user_attr("ids", [*study.user_attrs.get("ids", []), sys.argv[1]])
    print("held", held, released, flush=True)
"""


def test_store_lock_serializes_optuna_workers_on_a_fresh_postgresql_database(postgres):
    from pfl.locking import store_lock

    urls = [postgres[name] for name in FRESH]
    workers = [subprocess.Popen([sys.executable, "-c", _LOCKED_WORKER, f"w{i}", *urls], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready"] * 2
        for url in urls:  # both start on the fresh database in the same instant
            for w in workers:
                w.stdin.write("go\n")
                w.stdin.flush()
            lines = [w.stdout.readline() for w in workers]
            if not all(line.startswith("held ") for line in lines):
                for w in workers:  # a worker crashed: show its traceback
                    w.kill()
                pytest.fail(f"{url}: a worker failed:\n" + "\n----\n".join(
                    line + w.communicate(timeout=30)[0] for line, w in zip(lines, workers)))
            (_, first_released), (second_held, _) = sorted(tuple(map(float, line.split()[1:])) for line in lines)
            assert first_released <= second_held, f"{url}: both workers held the lock at once: {lines}"
            study = optuna.load_study(study_name="s", storage=url)
            assert sorted(study.user_attrs["ids"]) == ["w0", "w1"]  # the read-modify-write kept both names
        for w in workers:
            assert w.wait(timeout=30) == 0
    finally:
        for w in workers:
            w.kill()
    with store_lock("http://127.0.0.1:1"), store_lock(f"postgresql+psycopg2://x:y@127.0.0.1:{_free_port()}/z"):
        pass  # an MLflow server's URL is not locked; an unreachable database proceeds (the store reports it)


def test_two_commands_open_one_fresh_postgresql_mlflow_store_at_once(postgres):
    """``MLFLOW_TRACKING_URI`` straight at PostgreSQL (no server): MLflow's migrations run once, under the advisory
    lock (:func:`pfl.tracking.configure_tracking`), while two processes open the fresh database together."""
    url = postgres[FRESH_MLFLOW]
    code = f"import mlflow; from pfl import tracking; tracking.configure_tracking({url!r}); " \
           "mlflow.MlflowClient().search_experiments()"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=STARTUP_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [e.name for e in mlflow.MlflowClient(url).search_experiments()] == ["Default"]
