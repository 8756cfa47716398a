"""Round progress on the terminal (tqdm), as an engine callback."""

from __future__ import annotations

from tqdm.auto import tqdm

from pfl.federated.engine import Callback, Evaluation
from pfl.vocabulary import headline_name, headline_score


class ProgressBar(Callback):
    """A tqdm bar over global rounds showing the last train loss, the averaged test accuracy and the best so far
    (PFLlib prints both every round).

    Args:
        total: number of global rounds.
        desc: label shown before the bar.
        initial: rounds already done (a resumed run).
    """

    def __init__(self, total: int, desc: str = "rounds", initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, unit="round", dynamic_ncols=True, initial=initial)
        self.postfix: dict[str, str] = {}
        self.best = float("-inf")  # the best headline score (an error negated: pfl.vocabulary.headline_score)
        self.best_value = float("nan")  # the headline at that evaluation

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        self.postfix["loss"] = f"{metrics['train/loss']:.3f}"
        self.bar.set_postfix(self.postfix)
        self.bar.update(1)

    def on_evaluate(self, evaluation: Evaluation) -> None:
        name = headline_name(evaluation.metrics)
        if headline_score(evaluation.metrics) > self.best:
            self.best, self.best_value = headline_score(evaluation.metrics), evaluation.metrics[name]
        short = name.partition("/")[2].removesuffix("_deg")  # acc, knn_acc, orthodromic, mse
        self.postfix[short] = f"{evaluation.metrics[name]:.4f}"
        self.postfix["best"] = f"{self.best_value:.4f}"
        self.bar.set_postfix(self.postfix)

    def on_run_end(self, final: Evaluation) -> None:
        self.bar.close()
