"""The methods of the experiments, one registry, all on the same towers, data pipeline and evaluator.

Every method is a function ``train(context, hp, seed) -> Trained`` that returns the method's
:class:`~csmf_tf.metrics.vectors.ScoringVectors` (plus parameter count and training time); the
runner scores them with one evaluator. Every fit is :func:`csmf_tf.training.fit.fit_until_best` (the
same early stopping for every method). Families:

- baselines: popularity (per objective; exposure popularity for every objective), single-objective
  two-towers (one per objective; ``separate`` combines them), the unified two-tower (mixture of all
  positives), shared-bottom and MMoE two-towers (one output vector per objective), naive sequential
  fine-tuning (one plain two-tower trained on exposure, then click, then conversion, all parameters
  trainable), fine-tuned copies (the exposure two-tower copied and fine-tuned once per later objective:
  no forgetting, ``S x D`` vectors, ``S x`` parameters: the upper bound CSMF approximates);
- CSMF and its ablations/variants: without CPP (random units, same counts), with AML (``eta > 0``
  when the default is 0, ``eta = 0`` otherwise), without accuracy recovery, weight-level CPP; the
  runner adds "without popularity prior" rows from the same trainings.

Stage 1 of every cascade-shaped method (CSMF and ablations, sequential, the exposure two-tower) is
the same training: an ordinary two-tower fitted on exposure with the same seed. It is trained once
per ``(hyperparameters, seed)`` (:meth:`Context.pretrained`) and each method continues from a copy;
its time is added to every such method's training time, as if each had trained it alone.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from csmf_tf.data.table import InteractionTable
from csmf_tf.data.tfdata import make_objective_dataset
from csmf_tf.metrics.vectors import ScoringVectors, combine, evaluate_vectors, popularity_scoring
from csmf_tf.models.multitask import (HEAD_WEIGHTINGS, MMOE, SHARED_BOTTOM, MultiVectorTwoTower,
                                      build_multitask_towers, head_loss_weights, multitask_dataset)
from csmf_tf.training.evaluation import cascade_vectors, count_parameters, multivector_vectors
from csmf_tf.training.fit import ValidationRecall, fit_until_best
from csmf_tf.training.stages import TrainingConfig, build_model, fit_objective, run_cascade, run_stage

# Family names (the report groups rows by them).
BASELINE, CSMF, ABLATION = "baseline", "csmf", "ablation"


@dataclasses.dataclass(frozen=True)
class HyperParams:
    """One point of the tuning grid (the same grid for every trained method), plus the knob only the
    multi-head baselines have: their later objectives' loss weight (:data:`HEAD_WEIGHTINGS`, ``None`` for
    the rest)."""

    learning_rate: float
    temperature: float
    head_weighting: float | None = None

    @property
    def key(self) -> str:
        heads = f",heads={self.head_weighting:g}" if self.head_weighting is not None else ""
        return f"lr={self.learning_rate:g},T={self.temperature:g}{heads}"


@dataclasses.dataclass
class Trained:
    """What a method's training returns: its vectors, size, time, and free-form logs."""

    vectors: ScoringVectors
    parameters: int
    seconds: float
    logs: dict = dataclasses.field(default_factory=dict)
    # The vectors with the popularity prior tuned on validation, and its alphas (set by the runner).
    with_prior: ScoringVectors | None = None
    prior_alphas: list[float] | None = None


@dataclasses.dataclass
class Pretrained:
    """A stage-1 (exposure) two-tower: tower weights as numpy, its fit log and time."""

    user_weights: list
    item_weights: list
    log: dict
    seconds: float


class Context:
    """Data, base configuration and the shared stage-1 pretrainings of one experiment.

    Args:
      data: a :class:`pipelines.common.PreparedData` (train/val/test, catalogs, eval sets).
      base: the :class:`TrainingConfig` every method starts from (towers, batch, epochs, tau, eta,
        fusion weights, ...); the grid overrides learning rate and temperature, the seed ``seed``.
      num_experts: MMoE experts.
      work_dir: where cascade checkpoints go (deleted per run unless kept).
    """

    def __init__(self, data, base: TrainingConfig, num_experts: int = 3, work_dir: Path | None = None,
                 verbose: int = 0):
        self.data = data
        self.base = base
        self.objectives = tuple(base.objectives)
        self.num_experts = num_experts
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="csmf-experiments-"))
        self.verbose = verbose
        self._pretrained: dict[tuple[HyperParams, int], Pretrained] = {}
        self.kept_runs: dict[tuple[str, HyperParams, int], Path] = {}

    @property
    def feature_kinds(self) -> dict[str, str]:
        return self.data.table.feature_kinds

    def config(self, hp: HyperParams, seed: int, **overrides) -> TrainingConfig:
        return dataclasses.replace(self.base, learning_rate=hp.learning_rate, temperature=hp.temperature,
                                   seed=seed, **overrides)

    def single_config(self, hp: HyperParams, seed: int, objective: str) -> TrainingConfig:
        """An ordinary (one-stage) two-tower of ``objective``."""
        return self.config(hp, seed).single_objective(objective)

    def fine_tune_config(self, hp: HyperParams, seed: int, stage: int) -> TrainingConfig:
        """A one-stage two-tower fine-tuned on objective ``stage`` with the batch size, learning rate
        and epochs CSMF's stage ``stage`` gets (the same budget for every fine-tune of a later
        objective)."""
        config = self.config(hp, seed)
        return dataclasses.replace(config.single_objective(self.objectives[stage - 1]),
                                   batch_size=config.batch_size_for(stage),
                                   learning_rate=config.learning_rate_for(stage),
                                   max_epochs=config.max_epochs_for(stage))

    def validation_score(self, objectives: Sequence[str], vectorise) -> ValidationRecall:
        return ValidationRecall(self.data.validation, objectives, vectorise, verbose=self.verbose > 0)

    def build(self, config: TrainingConfig):
        # No FactorizedTopK metrics: the experiments score with the exact evaluator only.
        return build_model(config, self.data.users, self.data.items, self.feature_kinds, factorized_metrics=False)

    def pretrained(self, hp: HyperParams, seed: int) -> Pretrained:
        """The stage-1 exposure two-tower of ``(hp, seed)``, trained on first use."""
        key = (hp, seed)
        if key not in self._pretrained:
            config = self.config(hp, seed)
            model = self.build(config)
            start = time.time()
            log = fit_objective(model, self.data.train, self.objectives[0], self.data.items,
                                self.data.validation, config, config.max_epochs, verbose=self.verbose)
            self._pretrained[key] = Pretrained(model.user_model.get_weights(), model.item_model.get_weights(),
                                               log, time.time() - start)
        return self._pretrained[key]

    def forget_pretrained(self, keep: Sequence[tuple[HyperParams, int]] = ()) -> None:
        for key in list(self._pretrained):
            if key not in keep:
                del self._pretrained[key]

    def from_pretrained(self, config: TrainingConfig, hp: HyperParams, seed: int):
        """A model of ``config`` holding the stage-1 pretraining of ``(hp, seed)``, in stage 1."""
        pre = self.pretrained(hp, seed)
        model = self.build(config)
        model.user_model.set_weights(pre.user_weights)
        model.item_model.set_weights(pre.item_weights)
        model.set_stage(1)
        return model, pre

    def cleanup(self) -> None:
        """Delete the scratch folder if this context created it."""
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def run_dir(self, name: str, hp: HyperParams, seed: int) -> Path:
        safe = hp.key.replace("=", "").replace(",", "_")
        return self.work_dir / f"{name}__{safe}__seed{seed}"


TrainFn = Callable[[Context, HyperParams, int], Trained]


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the report.

    ``select_on``: objectives whose mean validation Recall@50 picks the grid point (``None``: all);
    ``tuned``: whether it has hyperparameters (popularity has none); ``parts``: for a composite
    method, the methods whose selected runs it combines (objective ``t`` from ``parts[t]``);
    ``prior``: scored with the popularity prior (:mod:`csmf_tf.metrics.prior`) when the budget turns
    it on; ``same_runs_as``: a row scored from another method's runs (e.g. without the prior);
    ``head_weightings``: the later heads' loss weights tuned beside every grid point (:meth:`points`).
    """

    name: str
    label: str
    family: str
    train: TrainFn | None = None
    select_on: tuple[str, ...] | None = None
    tuned: bool = True
    parts: tuple[str, ...] = ()
    description: str = ""
    prior: bool = True
    same_runs_as: str | None = None
    head_weightings: tuple[float, ...] = ()

    def points(self, hp: HyperParams) -> list[HyperParams]:
        """What the method trains at grid point ``hp``: ``hp`` itself, or ``hp`` with each of its head
        weightings (more tuning than the others get: never less for a baseline)."""
        return [dataclasses.replace(hp, head_weighting=w) for w in self.head_weightings] or [hp]


# ----- training functions -----------------------------------------------------------------------------

def train_popularity(source_first: bool) -> TrainFn:
    def train(ctx: Context, hp: HyperParams, seed: int) -> Trained:
        start = time.time()
        vectors = popularity_scoring(ctx.data.train, ctx.data.validation, ctx.objectives,
                                     source=ctx.objectives[0] if source_first else None)
        return Trained(vectors, 0, time.time() - start)
    return train


def train_single(objective_index: int) -> TrainFn:
    """An ordinary two-tower of one objective; exposure's is the shared stage-1 pretraining itself."""
    def train(ctx: Context, hp: HyperParams, seed: int) -> Trained:
        objective = ctx.objectives[objective_index]
        config = ctx.single_config(hp, seed, objective)
        if objective_index == 0:
            model, pre = ctx.from_pretrained(config, hp, seed)
            log, seconds = pre.log, pre.seconds
        else:
            model = ctx.build(config)
            start = time.time()
            log = fit_objective(model, ctx.data.train, objective, ctx.data.items, ctx.data.validation, config,
                                config.max_epochs, verbose=ctx.verbose)
            seconds = time.time() - start
        return Trained(cascade_vectors(model, ctx.data.validation, ctx.objectives), count_parameters(model),
                       seconds, {"fit": log})
    return train


def train_unified(ctx: Context, hp: HyperParams, seed: int) -> Trained:
    """One two-tower on every objective's positives (:func:`mixture_table`), early-stopped on the mean
    validation Recall@50 over the objectives."""
    config = ctx.single_config(hp, seed, ctx.objectives[0])
    model = ctx.build(config)
    rows = mixture_table(ctx.data.train, ctx.objectives)
    dataset = make_objective_dataset(rows, ctx.objectives[0], config.batch_size, shuffle=True, seed=seed + 1,
                                     item_catalog=ctx.data.items)
    score = ctx.validation_score(ctx.objectives, lambda m: cascade_vectors(m, ctx.data.validation, ctx.objectives))
    log = fit_until_best(model, dataset, score, config.learning_rate, config.max_epochs, config.patience,
                         config.start_is_candidate, verbose=ctx.verbose, optimizer=config.optimizer)
    return Trained(cascade_vectors(model, ctx.data.validation, ctx.objectives), count_parameters(model),
                   log["seconds"], {"fit": log, "rows": len(rows)})


def train_multitask(architecture: str) -> TrainFn:
    def train(ctx: Context, hp: HyperParams, seed: int) -> Trained:
        config = ctx.config(hp, seed)
        user, item = build_multitask_towers(architecture, ctx.data.users, ctx.data.items, ctx.feature_kinds,
                                            config.tower, len(ctx.objectives), ctx.num_experts, seed=seed)
        weights = head_loss_weights(ctx.objectives, 1.0 if hp.head_weighting is None else hp.head_weighting)
        model = MultiVectorTwoTower(user, item, ctx.objectives, temperature=config.temperature,
                                    remove_accidental_hits=config.remove_accidental_hits, loss_weights=weights)
        dataset = multitask_dataset(ctx.data.train, ctx.objectives, config.batch_size, ctx.data.items, seed=seed)
        score = ctx.validation_score(ctx.objectives, lambda m: multivector_vectors(m, ctx.data.validation))
        log = fit_until_best(model, dataset, score, config.learning_rate, config.max_epochs, config.patience,
                             config.start_is_candidate, verbose=ctx.verbose, optimizer=config.optimizer)
        return Trained(multivector_vectors(model, ctx.data.validation), count_parameters(model), log["seconds"],
                       {"fit": log, "loss_weights": list(weights)})
    return train


def train_sequential(ctx: Context, hp: HyperParams, seed: int) -> Trained:
    """Naive sequential fine-tuning: the stage-1 two-tower fine-tuned on each later objective in turn,
    every parameter trainable, early stopping on the current objective. Logs the validation
    Recall@50 of every objective after each step (forgetting)."""
    model, pre = ctx.from_pretrained(ctx.single_config(hp, seed, ctx.objectives[0]), hp, seed)
    seconds = pre.seconds
    steps = [{"after": ctx.objectives[0], "fit": pre.log, "val": _val_recall(ctx, model)}]
    for stage, objective in enumerate(ctx.objectives[1:], start=2):
        config = ctx.fine_tune_config(hp, seed, stage)
        start = time.time()
        log = fit_objective(model, ctx.data.train, objective, ctx.data.items, ctx.data.validation, config,
                            config.max_epochs, verbose=ctx.verbose)
        seconds += time.time() - start
        steps.append({"after": objective, "fit": log, "val": _val_recall(ctx, model)})
    return Trained(cascade_vectors(model, ctx.data.validation, ctx.objectives), count_parameters(model),
                   seconds, {"steps": steps})


def train_finetuned_copies(ctx: Context, hp: HyperParams, seed: int) -> Trained:
    """Fine-tuned copies: the stage-1 two-tower serves the first objective; for every later objective a
    copy of it is fine-tuned on that objective alone, every parameter trainable. No forgetting, at
    ``S x`` the parameters and ``S x D`` served dimensions."""
    model, pre = ctx.from_pretrained(ctx.single_config(hp, seed, ctx.objectives[0]), hp, seed)
    parts = [cascade_vectors(model, ctx.data.validation, ctx.objectives)]
    parameters, seconds, fits = count_parameters(model), pre.seconds, [pre.log]
    for stage, objective in enumerate(ctx.objectives[1:], start=2):
        config = ctx.fine_tune_config(hp, seed, stage)
        copy, _ = ctx.from_pretrained(config, hp, seed)
        start = time.time()
        fits.append(fit_objective(copy, ctx.data.train, objective, ctx.data.items, ctx.data.validation, config,
                                  config.max_epochs, verbose=ctx.verbose))
        seconds += time.time() - start
        parts.append(cascade_vectors(copy, ctx.data.validation, ctx.objectives))
        parameters += count_parameters(copy)
    return Trained(combine(parts, ctx.objectives), parameters, seconds, {"fits": fits})


def _val_recall(ctx: Context, model) -> dict[str, float]:
    results = evaluate_vectors(cascade_vectors(model, ctx.data.validation, ctx.objectives), ctx.data.validation,
                               ks=(50,))["stage"]
    return {o: results[f"{o}/recall@50"] for o in ctx.objectives if f"{o}/recall@50" in results}


def mixture_table(train: InteractionTable, objectives: Sequence[str]) -> InteractionTable:
    """The unified model's rows: every objective's positive rows, stacked (a click is an exposure row
    *and* a click row, so deeper actions weigh more), all labelled positive for ``objectives[0]``.

    Training on ``objectives[0]`` of this table is training on the mixture of all positives; the log-Q
    sampling probabilities are then the item frequencies of the mixture.
    """
    mixed = InteractionTable.concat([train.take(train.positives(o)) for o in objectives])
    labels = np.zeros_like(mixed.labels)
    labels[:, mixed.objective_index(objectives[0])] = 1
    mixed.labels = labels
    return mixed


def train_csmf(name: str, keep: bool = False, **overrides) -> TrainFn:
    """CSMF with ``overrides`` of the base configuration (the ablations), continuing the shared stage-1
    pretraining: CPP and recovery of stage 1 (:func:`run_stage` with ``trained=``), then the later
    stages (:func:`run_cascade`). ``keep``: keep the run's checkpoints (the sweeps start from them)."""
    def train(ctx: Context, hp: HyperParams, seed: int) -> Trained:
        return run_csmf(ctx, hp, seed, name, keep=keep, **overrides)
    return train


def run_csmf(ctx: Context, hp: HyperParams, seed: int, name: str, keep: bool = False,
             from_stage: int = 1, source: Path | None = None, **overrides) -> Trained:
    """Train a CSMF variant; ``from_stage > 1`` starts from ``source``'s checkpoint of stage
    ``from_stage - 1`` instead (sweeps of later-stage settings, which leave earlier stages unchanged)."""
    config = ctx.config(hp, seed, **overrides)
    out = ctx.run_dir(name, hp, seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds = 0.0
    if from_stage == 1:
        model, pre = ctx.from_pretrained(config, hp, seed)
        start = time.time()
        logs = [run_stage(1, model, ctx.data.train, ctx.data.items, ctx.data.validation, config, out,
                          verbose=ctx.verbose, trained=pre.log)]
        seconds = pre.seconds + time.time() - start
    else:
        model = ctx.build(config)
        shutil.copytree(Path(source) / f"stage_{from_stage - 1}", out / f"stage_{from_stage - 1}")
        logs = []
    start = time.time()
    logs += run_cascade(model, ctx.data.train, ctx.data.items, ctx.data.validation, config, out,
                        stages=range(max(from_stage, 2), model.num_stages + 1), verbose=ctx.verbose)
    seconds += time.time() - start
    trained = Trained(cascade_vectors(model, ctx.data.validation, ctx.objectives), count_parameters(model),
                      seconds, {"stages": logs, "owner_stage": model.owner_stage.tolist()})
    if keep:
        ctx.kept_runs[(name, hp, seed)] = out
    else:
        shutil.rmtree(out, ignore_errors=True)
    return trained


# ----- the registry -----------------------------------------------------------------------------------

#: The margin of the AML variant when the default is eta = 0 (logit units, see csmf_tf/tasks/aml.py).
AML_ETA = 0.5


def registry(objectives: Sequence[str], eta: float = 0.0) -> list[Method]:
    """Every method, in report order. Single-objective towers are named ``two_tower[<objective>]``.
    ``eta``: CSMF's default margin; the AML row is the other setting (``AML_ETA`` or 0)."""
    objectives = tuple(objectives)
    singles = [Method(f"two_tower[{o}]", f"two-tower ({o} only)", BASELINE, train_single(t), select_on=(o,),
                      description=f"ordinary two-tower trained on {o} positives, ranking every objective")
               for t, o in enumerate(objectives)]
    if eta == 0.0:
        aml = Method("csmf_aml", f"CSMF with AML (eta={AML_ETA:g})", ABLATION, train_csmf("csmf_aml", eta=AML_ETA),
                     description=f"adaptive margin eta={AML_ETA:g} nats in stages t > 1")
    else:
        aml = Method("csmf_no_aml", "CSMF w/o AML (eta=0)", ABLATION, train_csmf("csmf_no_aml", eta=0.0),
                     description="plain TFRS loss in every stage")
    return [
        Method("popularity", "popularity (per objective)", BASELINE, train_popularity(False), tuned=False,
               prior=False, description="items by their count of training positives of the objective"),
        Method("popularity_exposure", f"popularity ({objectives[0]})", BASELINE, train_popularity(True),
               tuned=False, prior=False,
               description=f"items by their count of {objectives[0]} positives, for every objective"),
        *singles,
        Method("separate", "separate two-towers", BASELINE, parts=tuple(m.name for m in singles),
               description="one two-tower per objective, each tuned on its own objective"),
        Method("unified", "unified two-tower (mixture)", BASELINE, train_unified,
               description="one two-tower trained on the mixture of all objectives' positives"),
        Method("shared_bottom", "shared-bottom two-tower", BASELINE, train_multitask(SHARED_BOTTOM),
               head_weightings=HEAD_WEIGHTINGS,
               description="shared embeddings+MLP, one linear output head per objective"),
        Method("mmoe", "MMoE two-tower", BASELINE, train_multitask(MMOE), head_weightings=HEAD_WEIGHTINGS,
               description="shared embeddings, experts with the tower's MLP sizes, per-objective gates and heads"),
        Method("sequential", "naive sequential fine-tuning", BASELINE, train_sequential,
               description="one two-tower fine-tuned exposure -> click -> conversion, all parameters trainable"),
        Method("finetuned_copies", "fine-tuned copies", BASELINE, train_finetuned_copies,
               description="the exposure two-tower copied and fine-tuned per later objective (S x D vectors)"),
        Method("csmf", "CSMF", CSMF, train_csmf("csmf", keep=True),
               description="unit-level CPP, accuracy recovery, popularity prior (the project's defaults)"),
        Method("csmf_no_prior", "CSMF w/o popularity prior", ABLATION, prior=False, same_runs_as="csmf",
               description="the CSMF runs scored without the popularity prior"),
        Method("csmf_no_cpp", "CSMF w/o CPP (random units)", ABLATION, train_csmf("csmf_no_cpp", random_selection=True),
               description="the same number of units per layer, chosen at random"),
        aml,
        Method("csmf_no_recovery", "CSMF w/o accuracy recovery", ABLATION,
               train_csmf("csmf_no_recovery", recovery=False), description="no fine-tuning after CPP"),
        Method("csmf_weight_level", "CSMF weight-level CPP", ABLATION,
               train_csmf("csmf_weight_level", granularity="weight", eta=0.0),
               description="CPP per weight (PackNet-like): one forward pass per stage, S*D serving; eta = 0 "
                           "(AML needs s_{t-1}, which weight-level ownership cannot give)"),
    ]


def combine_parts(parts: Sequence[Trained], objectives: Sequence[str]) -> Trained:
    """A composite method (``separate``): objective ``t`` from ``parts[t]``; sizes and times add up."""
    return Trained(combine([p.vectors for p in parts], objectives), sum(p.parameters for p in parts),
                   sum(p.seconds for p in parts), {"parts": [p.logs for p in parts]})


__all__ = ["BASELINE", "CSMF", "ABLATION", "HyperParams", "Trained", "Pretrained", "Context", "Method",
           "registry", "combine_parts", "run_csmf", "mixture_table", "AML_ETA"]
