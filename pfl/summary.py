"""What a researcher reads at the end of a command: seed summaries, run descriptions and the terminal table.

* :func:`seed_summary`: mean and std over seeds of the final and best quality metrics of FL runs,
  logged by launch runs (``test/acc``, ``test/acc_seed_std``, ``best/test_acc``, ...) so the
  collapsed runs table shows results; a sweep logs one per cell (``dir0.1-jr0.2/test_acc``).
* :func:`fl_description`, :func:`head_description`, :func:`launch_description`: Markdown for the
  runs' ``mlflow.note.content`` (the description on a run's page): the setting, the final metrics
  and how to load the models.
* :func:`summary_table`: the table ``pfl train``, ``pfl sweep`` and ``pfl tune`` print at the end:
  final and best test accuracy, NLL, F-ECE (± std across clients) and wall time per run.

Plain functions of params and metrics dicts (as :func:`pfl.tracking.run_summary` reads them); nothing
here talks to MLflow.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Mapping, Sequence

from pfl.vocabulary import QUALITY, best_name, flat, headline_name

_CLASSIFICATION = (("test/acc", "acc (%)", 100), ("test/nll", "NLL (nats)", 1), ("test/f_ece", "F-ECE (%)", 100),
                   ("test/ece_mean", "ECE mean (%)", 100), ("test/global_ece", "global ECE (%)", 100))
_SELF_SUPERVISED = (("test/knn_acc", "kNN acc (%)", 100), ("test/linear_acc", "linear acc (%)", 100))
_REGRESSION = (("test/mse", "MSE", 1), ("test/orthodromic_deg", "orthodromic error (deg)", 1))
_SHOWN = _CLASSIFICATION + _SELF_SUPERVISED + _REGRESSION
_DIGITS = {"mse": 4}  # decimals of a metric shown with other than 2 (an MSE of unit vectors is ~0.05)


def _summarized(name: str) -> bool:
    """Final and best quality metrics (``test/acc``, ``test/acc_vgg11``, ``best/test_f_ece``), not spreads."""
    metric = name.removeprefix("best/test_").removeprefix("test/")
    return (name.startswith(("test/", "best/test_")) and metric.startswith(QUALITY)
            and not metric.endswith("_std"))


def seed_summary(runs: Sequence[Mapping[str, float]], cell: str | None = None) -> dict[str, float]:
    """Mean and population std over seeds of every final and best quality metric the FL runs share.

    Args:
        runs: each FL run's metrics (name -> latest value).
        cell: ``None`` for a launch run of one setting (``test/acc`` = the mean, ``test/acc_seed_std``);
            a sweep cell's name puts every metric under it (``<cell>/test_acc``, ``<cell>/test_acc_seed_std``).

    Returns:
        the metrics to log, plus ``seeds`` (or ``<cell>/seeds``): the number of runs.
    """
    names = [k for k in runs[0] if _summarized(k) and all(k in r for r in runs)] if runs else []
    key = (lambda n: n) if cell is None else (lambda n: f"{cell}/{flat(n)}")
    out = {}
    for name in names:
        values = [r[name] for r in runs]
        out[key(name)] = statistics.fmean(values)
        out[key(name) + "_seed_std"] = statistics.pstdev(values)
    out["seeds" if cell is None else f"{cell}/seeds"] = float(len(runs))
    return out


def _pct(value: float | None, std: float | None = None, scale: float = 100, digits: int = 2) -> str:
    """``value * scale`` with ``digits`` decimals and ``± std`` when given; an em dash for a missing value."""
    if value is None:
        return "—"
    text = f"{value * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _digits(key: str) -> int:
    """Decimals of metric ``key`` (``test/mse``: 4; :data:`_DIGITS`), else 2."""
    return _DIGITS.get(key.partition("/")[2].removeprefix("test_"), 2)


def _best_entry(metrics: Mapping[str, float]) -> tuple[str, str, float, int] | None:
    """``(key, label, scale, digits)`` of the run's best-round headline, ``("best/test_acc", "best acc (%)", 100,
    2)``: the metric that picked its best round (:func:`pfl.vocabulary.headline_name`); ``None`` without one."""
    try:
        name = headline_name(metrics)
    except KeyError:
        return None
    label, scale = next(((label, scale) for k, label, scale in _SHOWN if k == name), (name, 1))
    return best_name(name), f"best {label}", scale, _digits(name)


def _best_item(metrics: Mapping[str, float]) -> str | None:
    """``- best acc (%): 81.20 at round 7``: the run's headline at its best round (:func:`_best_entry`)."""
    entry = _best_entry(metrics)
    if entry is None or entry[0] not in metrics:
        return None
    key, label, scale, digits = entry
    return f"- {label}: {_pct(metrics[key], None, scale, digits)} at round {int(metrics.get('best/round', 0))}"


def _metric_items(metrics: Mapping[str, float]) -> list[str]:
    """Markdown list items ``- name: value ± std across clients`` of the final quality metrics (``test/*``).

    Lists, not tables: MLflow's UI draws Markdown tables without cell padding, so their numbers run together.
    """
    return [f"- {label}: {_pct(metrics[key], metrics.get(key + '_std'), scale, _digits(key))}"
            for key, label, scale in _SHOWN if key in metrics]


def fl_description(name: str, setting: str, metrics: Mapping[str, float], run_id: str, tracking_uri: str) -> str:
    """Markdown description of a finished FL run: setting, final and best metrics, loading snippet."""
    lines = [f"**{name}**: {setting}", "", "Final evaluation, test-sample-weighted mean over clients (± std across "
             "clients):", "", *_metric_items(metrics)]
    best = _best_item(metrics)
    lines += [best] if best else []
    regression = "test/mse" in metrics
    what = ("float histories (N, T, F) -> (N, D) predictions (positions)" if regression else
            "uint8 images (N, C, H, W) -> (N, K) probabilities")
    call = "predictions = ...predict(histories)" if regression else "probs = ...predict(images)"
    lines += ["", "Load a client's personalized model (`model.base`, `model.head`):", "", "```python",
              "from pfl.tracking import configure_tracking, load_client_model",
              f'configure_tracking("{tracking_uri}")', f'model = load_client_model("{run_id}", client_id=0)', "",
              f"import mlflow  # or as an MLflow model: {what}",
              call.replace("...", f'mlflow.pyfunc.load_model("runs:/{run_id}/clients/client_000").'), "```"]
    if "test/acc" in metrics:
        lines += ["", f"Head ensembles on it: `pfl heads --run-id {run_id} --method aph` (or `loraph`)."]
    return "\n".join(lines)


def head_description(name: str, setting: str, metrics: Mapping[str, float], run_id: str, fl_run_id: str,
                     method: str) -> str:
    """Markdown description of a head run: setting, the unmodified models (w/o) against the ``method`` ensemble,
    how to load a client's members."""
    items = [f"- {label}: w/o {_pct(metrics.get('wo/' + key[5:]), None, scale)} → {method} "
             f"{_pct(metrics.get(key), None, scale)}" for key, label, scale in _CLASSIFICATION]
    lines = [f"**{name}**: {setting}", "", "Test-sample-weighted means over clients:", "", *items, "",
             "Client 0's ensemble as an MLflow model (uint8 images (N, C, H, W) -> probabilities (N, K)):", "",
             "```python", "import mlflow",
             f'probs = mlflow.pyfunc.load_model("runs:/{run_id}/heads/client_000").predict(images)', "```", "",
             f"Its base is client 0's model of FL run `{fl_run_id}`; the members (stacked tensors and learning "
             "rates) are `heads/client_000/artifacts/members.safetensors`."]
    return "\n".join(lines)


def launch_description(name: str, setting: str, summary: Mapping[str, float], run_names: Sequence[str]) -> str:
    """Markdown description of a launch run: setting, mean ± std over seeds (the value alone for one seed), its
    FL runs."""
    several = len(run_names) > 1
    best = _best_entry(summary)
    shown = [(k, label, scale, _digits(k)) for k, label, scale in _SHOWN] + ([best] if best else [])
    items = [f"- {label}: {_pct(summary[k], summary.get(k + '_seed_std') if several else None, scale, digits)}"
             for k, label, scale, digits in shown if k in summary]
    title = f"mean ± std over {len(run_names)} seeds" if several else "1 seed"
    return "\n".join([f"**{name}**: {setting}", "", f"Final evaluation ({title}):", "", *items, "",
                       "FL runs: " + ", ".join(run_names)])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


def summary_table(rows: Sequence[Mapping]) -> str:
    """The end-of-command table: one line per run.

    Args:
        rows: per run ``{"name", "metrics": {name: value}, "seconds": wall time or None}``; FL runs show
            their final ``test/*`` and ``best/test_acc``; head runs their method's ``test/*``.

    Returns:
        a fixed-width text table (pandas): run, acc (%), best acc (%) at its round, NLL, F-ECE (%) ± std
        across clients, global ECE (%), and, where any run has them, self-supervised runs' kNN and linear-probe
        accuracies (%) ± std across clients (best acc: their kNN accuracy's), wall time.
    """
    if rows and all("test/mse" in row["metrics"] for row in rows):
        return _regression_table(rows)
    table = []
    extra = [(k, label) for k, label, _ in _SELF_SUPERVISED if any(k in row["metrics"] for row in rows)]
    for row in rows:
        m = row["metrics"]
        best = m.get("best/test_acc", m.get("best/test_knn_acc"))
        table.append({"run": row["name"], "acc (%)": _pct(m.get("test/acc")),
                      "best acc (%)": "—" if best is None else f"{_pct(best)} (r{int(m.get('best/round', 0))})",
                      "NLL": "—" if "test/nll" not in m else f"{m['test/nll']:.3f}",
                      "F-ECE (%)": _pct(m.get("test/f_ece"), m.get("test/f_ece_std")),
                      "global ECE (%)": _pct(m.get("test/global_ece")),
                      **{label: _pct(m.get(k), m.get(k + "_std")) for k, label in extra},
                      "time": _duration(row.get("seconds"))})
    import pandas as pd  # here, not at import: pandas (and pyarrow) add 65 MB to every training process's RSS

    return pd.DataFrame(table).to_string(index=False)


def _regression_table(rows: Sequence[Mapping]) -> str:
    """:func:`summary_table` of regression runs: run, MSE and orthodromic error (deg) ± std across clients, the
    headline (orthodromic error, else MSE) at the best round, wall time."""
    import pandas as pd

    table = []
    for row in rows:
        m = row["metrics"]
        best = _best_entry(m)
        shown = "—" if best is None or best[0] not in m else \
            f"{_pct(m[best[0]], None, 1, best[3])} (r{int(m.get('best/round', 0))})"
        table.append({"run": row["name"], "MSE": _pct(m.get("test/mse"), m.get("test/mse_std"), 1, 4),
                      "orthodromic (deg)": _pct(m.get("test/orthodromic_deg"), m.get("test/orthodromic_deg_std"), 1),
                      "best": shown,
                      "time": _duration(row.get("seconds"))})
    return pd.DataFrame(table).to_string(index=False)


def ui_hint(uri: str) -> str:
    """The command that shows a tracking store's runs: ``open <url>`` for a tracking server, else
    ``mlflow ui --backend-store-uri <uri>`` (shell-quoted)."""
    if uri.startswith(("http:", "https:")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
