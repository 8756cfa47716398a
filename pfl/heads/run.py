"""A head run: APH or LoRAPH on every client of a finished FL run, tracked as its nested MLflow run.

FL run id -> its config and client models -> the same data and partition (checked by
fingerprint) -> per client, one at a time: load the personalized model, rearrange its
head (:func:`pfl.heads.rearrange.rearrange_client`), save the members, score the
unmodified model and the ensemble on the client's test split -> summary metrics
(:func:`pfl.metrics.reliability_summary`; the ensemble's as ``test/*``, the unmodified models' as ``wo/*``), a per-client CSV table and the pooled
reliability-diagram bins of both (``reliability.json``).

OOD detection (:mod:`pfl.heads.ood`): unless ``ood_dataset=none``, the OOD pool is loaded once,
before the head run is created, and both models of every client also predict on the client's
OOD sample (as many images as its test split). Per client, :func:`pfl.metrics.ood_detection`
gives AUROC and AUPR (in-distribution = positive class) of the maximum softmax probability
(``msp``) and of the negative predictive entropy (``entropy``); the run logs their
test-sample-weighted means over clients as ``wo/ood_<auroc|aupr>_<msp|entropy>`` and
``ood/<auroc|aupr>_<msp|entropy>``, and the resolved OOD set as param ``ood_dataset``.

Host memory holds one client's model and members at a time, so it does not grow with
the number of clients.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pfl.algorithms import REGISTRY
from pfl.data.datasets import CATALOG
from pfl.tasks import task_of
from pfl.config import ConfigError, HeadConfig, RunConfig, algorithm_fields
from pfl.heads import METHOD_LABELS
from pfl.heads.ood import OODPool, load_ood_pool, resolve_ood_dataset
from pfl.heads.rearrange import ClientHeads, rearrange_client
from pfl.metrics import classification_metrics, ood_detection, reliability_bins, reliability_summary, weighted_mean
from pfl.summary import head_description
from pfl.train import Prepared, prepare

# FL-run params a head run repeats, so reports select head runs by setting (only those the FL run's partition has)
FL_SETTING = ("algo", "dataset", "partition", "alpha", "classes_per_client", "partition_name", "join_ratio")


def fl_config(inputs_config: dict, hc: HeadConfig) -> RunConfig:
    """The FL run's configuration, with the head run's ``data_dir``, ``device`` and ``num_threads``."""
    values = {**inputs_config, "device": hc.device, "num_threads": hc.num_threads}
    if hc.data_dir is not None:
        values["data_dir"] = hc.data_dir
    return RunConfig(**algorithm_fields(values))


def ood_pool(hc: HeadConfig, cfg: RunConfig, cells: list[Prepared]) -> OODPool | None:
    """The OOD pool of head runs with ``hc`` on FL runs of ``cells`` (``None`` with ``ood_dataset=none``).

    Loaded once, before any run exists: by a head run for itself, by a sweep for all its
    cells (which share dataset, data folder and device), so a missing or too small OOD set
    stops a sweep before its first FL run and the pool is read once.

    Raises:
        ConfigError: the OOD set is the FL run's dataset, its folder is missing, or it is smaller
            than the largest client test split of any cell.
    """
    name = resolve_ood_dataset(hc.ood_dataset, cfg.dataset)
    if name is None:
        return None
    largest = max(len(c.test) for p in cells for c in p.partition.clients)
    first = cells[0]
    size = first.transform.output_shape(tuple(first.dataset.inputs.shape[1:]))[1:]  # the models' input size
    return load_ood_pool(name, cfg.data_dir, first.device, size, largest)


def _ood_columns(result: ClientHeads) -> dict[str, float]:
    """Per-client OOD columns ``wo_ood_*`` and ``ood_*`` (empty without an OOD sample)."""
    if result.ood_probs is None:
        return {}
    wo = ood_detection(result.probs_wo, result.ood_probs_wo)
    ours = ood_detection(result.probs, result.ood_probs)
    return {**{f"wo_ood_{k}": v for k, v in wo.items()}, **{f"ood_{k}": v for k, v in ours.items()}}


def _log_summaries(rows: list[dict], pooled: dict[str, list[torch.Tensor]], labels: list[torch.Tensor],
                   hc: HeadConfig) -> None:
    """Summary metrics (``wo_*`` and the method's) and the pooled reliability bins of both."""
    from pfl import tracking

    weights, y = [r["num_test"] for r in rows], torch.cat(labels)
    metrics, bins = {}, {}
    for column, group, label in (("wo_", "wo/", "w/o"), ("", "test/", METHOD_LABELS[hc.method])):
        probs = torch.cat(pooled[column])
        clients = [{k: r[column + k] for k in ("acc", "nll", "ece", "brier")} for r in rows]
        summary = reliability_summary(clients, weights, probs, y, hc.global_ece_bins)
        metrics.update({group + k: v for k, v in summary.items()})
        bins[label] = reliability_bins(probs, y, hc.global_ece_bins)
    ood = {k: k.replace("wo_ood_", "wo/ood_") if k.startswith("wo_") else k.replace("ood_", "ood/", 1)
           for k in rows[0] if k.startswith(("wo_ood_", "ood_"))}  # client column -> run metric
    metrics.update({name: weighted_mean([r[k] for r in rows], weights) for k, name in ood.items()})
    metrics["time/heads"] = sum(r["seconds"] for r in rows)
    tracking.log_metrics(metrics)
    tracking.log_json(bins, "reliability.json")


def run_heads(fl_run_id: str, hc: HeadConfig, progress: bool = True, like: Prepared | None = None,
              pools: dict[str, OODPool | None] | None = None) -> str:
    """Run ``hc.method`` on every client of FL run ``fl_run_id``; returns the head run's id.

    ``like``: already prepared data on the same dataset, reused instead of loading it again;
    ``pools``: OOD pools already loaded for it (:func:`ood_pool`), by ``ood_dataset`` setting.

    Raises:
        FLRunError: the run id is unknown, not an FL run, lacks client models, is self-supervised (its head
            is a projection, not a classifier) or a regression (viewport prediction) (before any head run is
            created).
        ConfigError: the data found differ from the FL run's (fingerprint mismatch), or the OOD
            set is missing or unusable (:func:`pfl.heads.ood.load_ood_pool`), also before any
            head run exists.
        Any error during the work: the head run ends FAILED; the FL run is untouched.
    """
    from pfl import tracking

    inputs = tracking.fl_run_inputs(fl_run_id)
    algo = REGISTRY.get(inputs.config.get("algo", ""))
    if algo is not None and not algo.classifier:
        raise tracking.FLRunError(f"run {fl_run_id} is self-supervised (algo={inputs.config['algo']}): its head is "
                                  "a projection, not a classifier; head methods need a classification FL run")
    task = CATALOG.get(inputs.config.get("dataset", ""))
    if task is not None and not task_of(task.task).classifier:
        raise tracking.FLRunError(f"run {fl_run_id} is {task_of(task.task).title} on {inputs.config['dataset']}: "
                                  "APH, LoRAPH and OOD detection rearrange a classifier's head; run them on a "
                                  "classification FL run")
    cfg = fl_config(inputs.config, hc)
    prepared = prepare(cfg, like)
    if prepared.fingerprint != inputs.params.get("dataset_fingerprint"):
        raise ConfigError(f"data_dir: the data in {cfg.data_dir} (fingerprint {prepared.fingerprint}) are not "
                          f"the FL run's ({inputs.params.get('dataset_fingerprint')}); set data_dir= to the "
                          "folder the run was trained on")
    ood = pools[hc.ood_dataset] if pools and hc.ood_dataset in pools else ood_pool(hc, cfg, [prepared])
    data = prepared.device_images()
    hc = hc.model_copy(update={"eval_batch_size": data.inference_batch_size(hc.eval_batch_size)})
    setting = {k: v for k, v in cfg.flat_params().items() if k in FL_SETTING}
    params = {**hc.flat_params(), **setting, "fl_run_id": fl_run_id, "fl_seed": inputs.params.get("seed"),
              "num_clients": inputs.num_clients, "ood_dataset": ood.name if ood else "none"}
    name = f"{hc.method}-{inputs.name}"
    rows: list[dict] = []
    pooled: dict[str, list[torch.Tensor]] = {"wo_": [], "": []}
    labels: list[torch.Tensor] = []
    specs = prepared.model_specs
    with tracking.head_run(fl_run_id, inputs.experiment_id, name, params) as run_id:
        for cid in tqdm(cfg.train_client_ids, desc=f"{hc.method} clients", disable=not progress):
            split = prepared.partition.clients[cid]
            model = tracking.load_client_model(fl_run_id, cid)
            result = rearrange_client(model, data, split.train.to(data.device), split.test.to(data.device), hc, cid,
                                      ood)
            tracking.log_member_heads(cid, result.members, result.lrs, fl_run_id, specs[cid],
                                      prepared.input_example(cid))
            y = prepared.dataset.targets[split.test]
            wo = classification_metrics(result.probs_wo, y, hc.ece_bins)
            ours = classification_metrics(result.probs, y, hc.ece_bins)
            rows.append({"client": cid, "num_train": len(split.train), "num_test": len(split.test),
                         **{f"wo_{k}": v for k, v in wo.items()}, **ours, "seconds": result.seconds,
                         "final_train_loss": result.train_loss[-1], **_ood_columns(result)})
            pooled["wo_"].append(result.probs_wo)
            pooled[""].append(result.probs)
            labels.append(y)
        tracking.log_metrics({"model/trainable_params_per_member": result.members.trainable_per_member()})
        tracking.log_csv(rows, "client_metrics.csv")
        _log_summaries(rows, pooled, labels, hc)
        text = f"{METHOD_LABELS[hc.method]} heads on every client of FL run {inputs.name} ({cfg.describe()})."
        tracking.set_description(run_id, head_description(name, text, tracking.run_metrics(run_id), run_id,
                                                          fl_run_id, METHOD_LABELS[hc.method]))
    return run_id
