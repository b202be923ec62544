"""The one fit protocol: a Keras ``fit`` with a fresh Adam, early stopping on validation Recall@K.

Every trained model of the project (CSMF stages, accuracy recovery, every baseline) is fitted by
:func:`fit_until_best`:

- :class:`ValidationRecall` writes the mean validation Recall@K over the objectives the model is
  judged on into the epoch logs (a stage: its own objective; a multi-head model: all of them);
- :class:`EarlyStoppingFromStart` stops after ``patience`` epochs without improvement and restores
  the best weights, where the weights the fit **starts from** are a candidate too [ours]. A CSMF stage
  ``t`` starts at ``s_t = s_{t-1}`` (zero item block), so its validation score can never end below the
  upstream stage's, and a fine-tune that only overfits (a small objective, one epoch too many) is
  undone instead of kept. ``start_is_candidate=False`` restores Keras' own rule (first epoch onwards).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors, mean_metric

VALIDATION_K = 50
Vectorise = Callable[[tf.keras.Model], ScoringVectors]


class ValidationRecall(tf.keras.callbacks.Callback):
    """Mean validation Recall@k over ``objectives`` of ``vectorise(model)``, written into the epoch logs
    as :attr:`monitor`; ``history[0]`` is the starting point when :meth:`measure` ran before epoch 1."""

    monitor = f"val_recall@{VALIDATION_K}"

    def __init__(self, data: EvaluationData, objectives: Sequence[str], vectorise: Vectorise,
                 verbose: bool = True):
        super().__init__()
        missing = [o for o in objectives if o not in data.eval_sets]
        if missing:
            raise ValueError(f"validation split has no positives for objectives {missing}")
        self.data, self.objectives, self.vectorise, self.verbose = data, tuple(objectives), vectorise, verbose
        self.history: list[float] = []
        self.start: float | None = None

    def measure(self) -> float:
        results = evaluate_vectors(self.vectorise(self.model), self.data, ks=(VALIDATION_K,))["stage"]
        return mean_metric(results, self.objectives, f"recall@{VALIDATION_K}")

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        value = self.measure()
        self.history.append(value)
        if logs is not None:
            logs[self.monitor] = value
        if self.verbose:
            print(f"  [{'+'.join(self.objectives)}] epoch {epoch + 1}: {self.monitor} = {value:.4f}", flush=True)


class EarlyStoppingFromStart(tf.keras.callbacks.EarlyStopping):
    """Keras ``EarlyStopping`` (max mode, best-weight restore) whose candidates include the start."""

    def __init__(self, score: ValidationRecall, patience: int, start_is_candidate: bool = True):
        super().__init__(monitor=score.monitor, mode="max", patience=patience, restore_best_weights=True)
        self.score, self.start_is_candidate = score, start_is_candidate

    def on_train_begin(self, logs: Mapping | None = None) -> None:
        super().on_train_begin(logs)
        if self.start_is_candidate:
            self.score.start = self.best = self.score.measure()
            self.best_weights, self.best_epoch = self.model.get_weights(), -1


def fit_until_best(model: tf.keras.Model, dataset: tf.data.Dataset, score: ValidationRecall,
                   learning_rate: float, max_epochs: int, patience: int, start_is_candidate: bool = True,
                   backup_dir: Path | None = None, verbose: int = 0) -> dict:
    """Fit with a fresh Adam (zero moments: a weight whose gradient is always zero never moves) until
    ``score`` has not improved for ``patience`` epochs; restore the best weights (see the module
    docstring). With ``backup_dir``, Keras ``BackupAndRestore`` saves every epoch there, so a killed
    fit resumes at its last epoch. ``UpdatePruningStep`` is required by the tfmot wrappers."""
    stopping = EarlyStoppingFromStart(score, patience, start_is_candidate)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), score, stopping]
    if backup_dir is not None:
        callbacks.insert(0, tf.keras.callbacks.BackupAndRestore(str(backup_dir)))
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate))
    start = time.time()
    model.fit(dataset, epochs=max_epochs, verbose=verbose, callbacks=callbacks)
    best = max(score.history + ([score.start] if score.start is not None else []))
    return {"objectives": list(score.objectives), "epochs": len(score.history), "start_val_recall@50": score.start,
            "val_recall@50": list(score.history), "best_val_recall@50": best,
            "best_epoch": stopping.best_epoch + 1, "seconds": time.time() - start}
