"""One training run end to end: the cascade, the popularity prior, test metrics, bundle and pictures.

:func:`train_csmf` is what ``pipelines.train_cascade`` and the main job run: every stage of
:func:`~csmf_tf.training.stages.run_cascade` (resumable, optionally under a ``tf.distribute``
strategy), then the popularity prior tuned on validation (:mod:`csmf_tf.metrics.prior`, when
``config.popularity_prior``), then the test split scored once, with and without the prior.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from csmf_tf.data.prepared import PreparedData
from csmf_tf.data.streaming import TFRecordSource
from csmf_tf.metrics.prior import PopularityPrior, log_popularity, tune_prior, with_prior
from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors
from csmf_tf.models.cascade import CascadeTwoTower
from csmf_tf.plots import plot_cpp_information, plot_ownership
from csmf_tf.serving.bundle import bundle_item_ids, save_tower_bundle
from csmf_tf.training import checkpoints
from csmf_tf.training.checkpoints import completed_stages, stage_dir
from csmf_tf.training.evaluation import cascade_vectors, served_columns
from csmf_tf.training.stages import TrainingConfig, build_model, run_cascade, run_stage


@dataclasses.dataclass
class TrainedRun:
    """The trained model, its stage logs, the test results and the prior it is scored (and served) with."""

    model: CascadeTwoTower
    logs: list[dict]
    results: dict
    prior: PopularityPrior | None
    out_dir: Path | None = None


def train_csmf(data: PreparedData, config: TrainingConfig, out_dir: Path, stages: Sequence[int] | None = None,
               verbose: int = 1, strategy=None, tensorboard_dir: Path | None = None,
               pretrained: TrainedRun | None = None) -> TrainedRun:
    """Run the cascade (or some stages) and score the final model on the test split.

    ``results``: ``{"stage", "fused"}`` with the prior when it is on, ``"without_prior"`` (the same
    without it) and ``"prior_alphas"``. Writes ``results.json``, the export bundle (``bundle/``, with the
    prior) and the ownership pictures under ``out_dir``. With a ``tf.distribute`` strategy the model
    is built in its scope, so every stage's ``fit`` is distributed.

    ``verbose``: 0 silent fits, 1 one line per epoch, 2 also Keras' progress bars.
    ``tensorboard_dir``: every stage's fits log to ``<tensorboard_dir>/stage_<t>`` (None: no TensorBoard).
    ``pretrained``: a finished run of the single-objective two-tower of ``config.objectives[0]``
    (``train_csmf(data, config.single_objective(...), ...)``). Its training *is* CSMF's stage-1 training
    (same towers, seed, data, batches and optimizer), so stage 1 starts from its weights at CPP instead
    of training again (:func:`~csmf_tf.training.stages.run_stage` with ``trained=``).
    """
    out_dir = Path(out_dir)
    # Forward passes outside fit (validation, test) also need the scope: the tfmot wrappers' masking
    # op is written for replica or strategy-scope contexts.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(config, data.users, data.items, data.table.feature_kinds)
        if pretrained is not None and stages is None and not completed_stages(out_dir):
            _continue_from(pretrained, model, data, config, out_dir, verbose, tensorboard_dir)
            stages = range(2, model.num_stages + 1)
        run_cascade(model, data.train, data.items, data.validation, config, out_dir, stages, verbose,
                    tensorboard_dir=tensorboard_dir)
        test = cascade_vectors(model, data.testing, data.table.objectives)
        validation = cascade_vectors(model, data.validation, data.table.objectives)
    return score_and_save(model, data, config, out_dir, test, validation)


def score_and_save(model: CascadeTwoTower, data: PreparedData, config: TrainingConfig, out_dir: Path,
                   test: ScoringVectors, validation: ScoringVectors, kept_alphas: Sequence[float] = ()) -> TrainedRun:
    """The end of a run: the prior tuned on validation, the test split scored with and without it,
    ``results.json``, the export bundle and the ownership pictures (see :func:`train_csmf`).

    ``test`` / ``validation``: the model's vectors for every objective of the data. ``kept_alphas``: the
    prior's alphas of the first objectives, kept instead of tuned (an extension keeps its base's, so that
    the objectives it already served score exactly as before).
    """
    objectives = data.table.objectives
    # The fused score sums the trained stages; the data's other objectives (a run on a prefix or a
    # subsequence of them) are ranked by the stage before them (scoring_stage) and weigh 0 in the fusion.
    served = served_columns(objectives, model.objectives)
    weights = None
    if config.num_stages > 1:
        weights = [0.0] * len(objectives)
        for stage, column in enumerate(served):
            weights[column] = config.fusion_weights[stage]
    ks = tuple(k for k in (20, 50, 100, 200) if k <= len(data.items)) or (len(data.items),)
    results = {"without_prior": evaluate_vectors(test, data.testing, weights, ks=ks)}
    prior = None
    if config.popularity_prior:
        log_pop = training_log_popularity(data, objectives)
        _, alphas = tune_prior(validation, log_pop, data.validation)
        alphas = [*kept_alphas, *alphas[len(kept_alphas):]]
        results.update(evaluate_vectors(with_prior(test, log_pop, alphas), data.testing, weights, ks=ks))
        results["prior_alphas"] = [float(a) for a in alphas]
        # The export serves the model's own stages: a single-objective model carries its objective's column.
        prior = PopularityPrior(log_pop[:, served], np.float32([alphas[c] for c in served]))
    else:
        results.update(results["without_prior"])
    logs = [json.loads((stage_dir(out_dir, s) / "metrics.json").read_text()) for s in completed_stages(out_dir)]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    # Towers + item catalog + ownership + prior, for `python -m pipelines.export --bundle <out>/bundle`.
    save_tower_bundle(out_dir / "bundle", model.user_model, model.item_model, data.items, model.owner_stage,
                      model.objectives, config.fusion_weights, config.to_json(), prior)
    if any("cpp" in log for log in logs):
        for tower in ("user", "item"):
            plot_ownership(out_dir, tower, out_dir / f"ownership_{tower}.png")
        plot_cpp_information(logs, out_dir / "cpp_information.png")
    return TrainedRun(model, logs, results, prior, out_dir)


def _continue_from(pretrained: TrainedRun, model: CascadeTwoTower, data: PreparedData, config: TrainingConfig,
                   out_dir: Path, verbose: int, tensorboard_dir: Path | None) -> None:
    """Stage 1 of ``model`` from ``pretrained``'s single-objective two-tower: its weights, then CPP and
    recovery (the stage's checkpoint is written, so :func:`run_cascade` goes on from stage 2)."""
    first = pretrained.model
    if first.num_stages != 1 or first.objectives[0] != config.objectives[0]:
        raise ValueError(f"pretrained must be a single-objective run of {config.objectives[0]!r}, got "
                         f"objectives {first.objectives}")
    expected = config.single_objective(config.objectives[0]).to_json()
    # Through from_json: a run recorded before a field existed reads it at its default, as a resume does.
    recorded = TrainingConfig.from_json(json.loads((stage_dir(pretrained.out_dir, 1) / "config.json").read_text()))
    if json.loads(json.dumps(recorded.to_json())) != json.loads(json.dumps(expected)):
        raise ValueError("pretrained was trained with other settings than this configuration's stage 1")
    model.user_model.set_weights(first.user_model.get_weights())
    model.item_model.set_weights(first.item_model.get_weights())
    model.set_stage(1)
    run_stage(1, model, data.train, data.items, data.validation, config, out_dir, verbose,
              trained=pretrained.logs[0]["train"], tensorboard_dir=tensorboard_dir)


def load_run(run_dir: Path, data: PreparedData) -> TrainedRun:
    """A finished :func:`train_csmf` run back in memory: the model at its last stage (built from the
    recorded configuration over ``data``'s catalogs), its stage logs, test results and prior.

    ``data`` must be the data the run was trained on (the same flags); a different item catalog than the
    run's bundle is refused, since the id vocabularies would silently map rows to other items.
    """
    run_dir = Path(run_dir)
    stages = completed_stages(run_dir)
    if not stages or not (run_dir / "results.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no finished run (stage_<t>/ checkpoints and results.json); "
                                "train it first (csmf train --out <dir>)")
    trained_ids = bundle_item_ids(run_dir / "bundle").astype(str)
    if not np.array_equal(trained_ids, np.asarray(data.items.ids).astype(str)):
        raise ValueError(f"{run_dir} was trained on another item catalog ({len(trained_ids):,} items) than "
                         f"these data ({len(data.items):,} items); pass the data flags the run was trained with")
    config = TrainingConfig.from_json(json.loads((stage_dir(run_dir, stages[-1]) / "config.json").read_text()))
    model = build_model(config, data.users, data.items, data.table.feature_kinds)
    checkpoints.load_stage(model, run_dir, stages[-1])
    logs = [json.loads((stage_dir(run_dir, s) / "metrics.json").read_text()) for s in stages]
    results = json.loads((run_dir / "results.json").read_text())
    prior = None
    if config.popularity_prior:
        served = served_columns(data.table.objectives, model.objectives)
        prior = PopularityPrior(training_log_popularity(data, data.table.objectives)[:, served],
                                np.float32([results["prior_alphas"][c] for c in served]))
    return TrainedRun(model, logs, results, prior, run_dir)


def scoring_vectors(run: TrainedRun, data: EvaluationData) -> ScoringVectors:
    """The run's stage scores on ``data`` (objectives: the model's stages), with its prior when it has one:
    what its export serves."""
    vectors = cascade_vectors(run.model, data, run.model.objectives)
    if run.prior is None:
        return vectors
    return with_prior(vectors, run.prior.log_popularity, run.prior.alphas)


def training_log_popularity(data: PreparedData, objectives: Sequence[str]) -> np.ndarray:
    """``L[i, t] = log(1 + c_t(i))`` over ``data.items`` from the training rows (in memory or shards)."""
    if not isinstance(data.train, TFRecordSource):
        return log_popularity(data.train, objectives, data.items.ids)
    row = {str(i): r for r, i in enumerate(data.items.ids)}
    source_rows = np.array([row[str(i)] for i in data.train.item_catalog().ids])
    out = np.zeros((len(data.items), len(objectives)), np.float32)
    for t, objective in enumerate(objectives):
        out[source_rows, t] = np.log1p(data.train.item_positive_counts(objective))
    return out
