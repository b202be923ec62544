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

Output: ``verbose=1`` prints one line per epoch (what was fitted, loss, validation Recall@K, elapsed
seconds) and no Keras progress bar; ``verbose=2`` adds Keras' progress bars. With ``tensorboard_dir``
the fit also logs to TensorBoard (:class:`EpochTensorBoard`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors, mean_metric
from csmf_tf.training.optimizers import ADAM, make_optimizer

VALIDATION_K = 50
Vectorise = Callable[[tf.keras.Model], ScoringVectors]


class ValidationRecall(tf.keras.callbacks.Callback):
    """Mean validation Recall@k over ``objectives`` of ``vectorise(model)``, written into the epoch logs
    as :attr:`monitor` (and per objective as ``val_recall@k/<objective>``); ``history[0]`` is the
    starting point when :meth:`measure` ran before epoch 1.

    With ``verbose`` it prints one line per epoch: ``label`` (default: the objectives), the training
    loss, the validation Recall@k and the seconds since the fit began.
    """

    monitor = f"val_recall@{VALIDATION_K}"

    def __init__(self, data: EvaluationData, objectives: Sequence[str], vectorise: Vectorise,
                 verbose: bool = True, label: str | None = None):
        super().__init__()
        missing = [o for o in objectives if o not in data.eval_sets]
        if missing:
            raise ValueError(f"validation split has no positives for objectives {missing}")
        self.data, self.objectives, self.vectorise, self.verbose = data, tuple(objectives), vectorise, verbose
        self.label = label or "+".join(self.objectives)
        self.history: list[float] = []
        self.start: float | None = None
        self.per_objective: dict[str, float] = {}
        self._began = time.time()

    def measure(self) -> float:
        results = evaluate_vectors(self.vectorise(self.model), self.data, ks=(VALIDATION_K,))["stage"]
        self.per_objective = {o: float(results[f"{o}/recall@{VALIDATION_K}"]) for o in self.objectives
                              if f"{o}/recall@{VALIDATION_K}" in results}
        return mean_metric(results, self.objectives, f"recall@{VALIDATION_K}")

    def on_train_begin(self, logs: Mapping | None = None) -> None:
        self._began = time.time()

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        value = self.measure()
        self.history.append(value)
        if logs is not None:
            logs[self.monitor] = value
            logs.update({f"{self.monitor}/{o}": v for o, v in self.per_objective.items()})
        if self.verbose:
            loss = (logs or {}).get("loss")
            loss_text = f"loss {float(loss):10.4f}" if loss is not None else "loss          -"
            print(f"  {self.label:<28} epoch {epoch + 1:>2}  {loss_text}  val Recall@{VALIDATION_K} {value:.4f}"
                  f"  {time.time() - self._began:6.1f} s", flush=True)


class EpochTensorBoard(tf.keras.callbacks.TensorBoard):
    """Keras' ``TensorBoard`` callback, once per epoch: training loss, validation Recall@K (the
    ``validation`` run, from :class:`ValidationRecall`; it must come before this callback) and the
    learning rate. Metrics a model only computes in ``evaluate`` (TFRS ``FactorizedTopK``) read 0
    during ``fit``, so they are left out instead of drawn as flat zero lines."""

    def __init__(self, log_dir: Path | str):
        super().__init__(log_dir=str(log_dir), histogram_freq=0, write_graph=False, write_images=False,
                         write_steps_per_second=False, update_freq="epoch", profile_batch=0)

    def on_epoch_end(self, epoch: int, logs: Mapping | None = None) -> None:
        kept = {k: v for k, v in (logs or {}).items() if "factorized_top_k" not in k}
        learning_rate = getattr(self.model.optimizer, "learning_rate", None)
        if learning_rate is not None and not callable(learning_rate):
            kept["learning_rate"] = float(tf.keras.backend.get_value(learning_rate))
        super().on_epoch_end(epoch, kept)


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
                   backup_dir: Path | None = None, verbose: int = 0, tensorboard_dir: Path | None = None,
                   optimizer: str = ADAM, steps_per_epoch: int | None = None) -> dict:
    """Fit with a fresh Adam (zero moments: a weight whose gradient is always zero never moves) until
    ``score`` has not improved for ``patience`` epochs; restore the best weights (see the module
    docstring). With ``backup_dir``, Keras ``BackupAndRestore`` saves every epoch there, so a killed
    fit resumes at its last epoch. ``UpdatePruningStep`` is required by the tfmot wrappers. With
    ``tensorboard_dir``, :class:`EpochTensorBoard` logs every epoch there (``train/`` and
    ``validation/`` runs). ``verbose``: 0 silent, 1 :class:`ValidationRecall`'s line per epoch (the
    score prints it when its own ``verbose`` is on), 2 also Keras' progress bars. ``optimizer``:
    ``"adam"`` (tf-keras Adam) or ``"lazy_adam"`` (row-wise sparse Adam, :mod:`csmf_tf.training.optimizers`).
    ``steps_per_epoch``: for a repeated dataset (parameter servers: :mod:`csmf_tf.training.parameter_servers`)."""
    stopping = EarlyStoppingFromStart(score, patience, start_is_candidate)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), score, stopping]
    if tensorboard_dir is not None:
        callbacks.append(EpochTensorBoard(tensorboard_dir))  # after ``score``: it logs its value
    if backup_dir is not None:
        callbacks.insert(0, tf.keras.callbacks.BackupAndRestore(str(backup_dir)))
        mark_built(model)
    model.compile(optimizer=make_optimizer(optimizer, learning_rate))
    start = time.time()
    model.fit(dataset, epochs=max_epochs, steps_per_epoch=steps_per_epoch, verbose=1 if verbose >= 2 else 0,
              callbacks=callbacks)
    best = max(score.history + ([score.start] if score.start is not None else []))
    return {"objectives": list(score.objectives), "epochs": len(score.history), "start_val_recall@50": score.start,
            "val_recall@50": list(score.history), "best_val_recall@50": best,
            "best_epoch": stopping.best_epoch + 1, "seconds": time.time() - start,
            # Steps the optimizer applied (its fresh ``iterations``): under parameter servers it shows
            # whether every scheduled step reached the variables.
            "optimizer_steps": int(model.optimizer.iterations.numpy())}


def mark_built(model: tf.keras.Model) -> None:
    """Tell Keras a TFRS model's variables exist, so ``BackupAndRestore`` builds the optimizer over them
    and restores a backup at once (an unbuilt model only gets a warning and deferred restoration).

    Keras marks a subclassed model built when it is *called*; a ``tfrs.Model`` has no ``call`` (it trains
    through ``compute_loss``), so it is never marked, although every trainable variable already exists:
    its towers are functional models, built when constructed.
    """
    if model.built:
        return
    towers = [layer for layer in model._flatten_layers(include_self=False, recursive=False)
              if isinstance(layer, tf.keras.Model)]
    if towers and all(tower.built for tower in towers) and model.trainable_variables:
        model.built = True
