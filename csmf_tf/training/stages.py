"""The CSMF stage loop: train -> CPP -> accuracy recovery -> freeze, once per objective.

Each stage is one Keras ``fit`` (plus one for recovery) with a fresh optimizer, early stopping on the
stage's own validation Recall@50 and best-weight restore. Each stage reads the previous stage's
checkpoint and writes its own (:mod:`csmf_tf.training.checkpoints`), so a stage can be re-run alone.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.features import ITEM_ID, USER_ID
from csmf_tf.data.streaming import TFRecordSource
from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.data.tfdata import make_objective_dataset
from csmf_tf.models.cascade import HARD_NEGATIVE_CORRECTIONS, NO_CORRECTION, CascadeTwoTower
from csmf_tf.models.towers import TowerConfig, build_tower
from csmf_tf.training import checkpoints, parameter_servers
from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.training.evaluation import current_vectors
from csmf_tf.training.fit import ValidationRecall, fit_until_best
from csmf_tf.training.optimizers import ADAM, OPTIMIZERS
from csmf_tf.training.selective_mask import UNIT, WEIGHT, selective_mask


@dataclasses.dataclass
class TrainingConfig:
    """Hyperparameters of a CSMF run, checked when built (:meth:`validate`). Fields marked [ours] are the
    project's choices (see README)."""

    objectives: tuple[str, ...] = ("exposure", "click", "conversion")
    tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
    temperature: float = 0.05
    learning_rate: float = 1e-3
    batch_size: int = 1024
    # [ours] stages t > 1 see far fewer positives (clicks ~10 %, conversions ~2 % of exposures): smaller
    # batches and a larger step give them enough updates before early stopping. None: as stage 1.
    later_stage_batch_size: int | None = 256
    later_stage_learning_rate: float | None = None
    later_stage_max_epochs: int | None = None
    max_epochs: int = 20
    patience: int = 2
    # [ours] the weights a fit starts from are an early-stopping candidate (training/fit.py): a later
    # stage can never end below s_{t-1} on validation.
    start_is_candidate: bool = True
    # tau[t-1]: CPP threshold applied after stage t (one per stage that has a successor).
    tau: tuple[float, ...] = (0.3, 0.3)
    # [ours] CPP after the last stage too, with this tau: the freed units are reserved for an objective
    # added later (training/extend.py), inactive (zero) until then. None: no reserve.
    reserve_tau: float | None = None
    granularity: str = UNIT                 # [ours] unit-level CPP; "weight" for the ablation
    min_output_units: int = 4               # [ours] output dims every later stage is guaranteed
    random_selection: bool = False          # ablation "without CPP": random units, same counts
    eta: float = 0.0                        # [ours] AML margin in logit units; 0 = plain TFRS loss
    zero_item_block: bool = True            # [ours] stage t starts at s_t = s_{t-1} (item block zero)
    hard_negatives: bool = True             # cascade hard negatives in stages t > 1
    hard_negative_correction: str = NO_CORRECTION  # [ours] their log-Q correction (models/cascade.py)
    recovery: bool = True                   # accuracy recovery after CPP
    recovery_fraction: float = 1.0          # [ours] share of the stage's training rows
    recovery_max_epochs: int = 5
    remove_accidental_hits: bool = True
    fusion_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    # [ours] score and serve s_t + alpha_t log(1 + c_t(i)), alpha_t tuned on validation (metrics/prior.py)
    popularity_prior: bool = True
    # Training cost at scale (README "Training at scale"): "lazy_adam" updates only the embedding rows a
    # batch touches (training/optimizers.py); sparse_embeddings masks looked-up rows instead of rewriting
    # whole tables (layers/masked.py). Both together: a step's cost does not grow with the catalogue.
    optimizer: str = ADAM
    sparse_embeddings: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.objectives, self.tau = tuple(self.objectives), tuple(float(t) for t in self.tau)
        self.fusion_weights = tuple(float(k) for k in self.fusion_weights)
        stages = len(self.objectives)
        if len(self.tau) == 1 and stages > 2:
            self.tau = self.tau * (stages - 1)
        if len(self.fusion_weights) != stages:
            self.fusion_weights = self.fusion_weights[:stages] + (1.0,) * max(0, stages - len(self.fusion_weights))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field (the command-line flag is ``--<field with dashes>``)."""
        stages = len(self.objectives)
        if stages < 1 or len(set(self.objectives)) != stages:
            raise ValueError(f"objectives must be distinct and not empty, got {self.objectives}")
        if len(self.tau) != max(stages - 1, 0):
            raise ValueError(f"tau needs {stages - 1} values (one per stage transition) for objectives "
                             f"{self.objectives}, got {self.tau}")
        bad_tau = [t for t in self.tau if not 0.0 <= t < 1.0]
        if bad_tau:
            raise ValueError(f"tau must be in [0, 1), got {bad_tau}")
        if self.reserve_tau is not None:
            if not 0.0 <= self.reserve_tau < 1.0:
                raise ValueError(f"reserve_tau must be in [0, 1), got {self.reserve_tau}")
            if self.granularity != UNIT:
                raise ValueError(f"reserve_tau needs granularity {UNIT!r}: a weight-level model cannot be served, "
                                 "so it cannot be extended and served either")
        if self.granularity not in (UNIT, WEIGHT):
            raise ValueError(f"granularity must be {UNIT!r} or {WEIGHT!r}, got {self.granularity!r}")
        if self.hard_negative_correction not in HARD_NEGATIVE_CORRECTIONS:
            raise ValueError(f"hard_negative_correction must be one of {HARD_NEGATIVE_CORRECTIONS}, "
                             f"got {self.hard_negative_correction!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.granularity == WEIGHT and self.eta != 0.0 and stages > 1:
            # The margin needs s_{t-1}; with weight-level ownership the output units stay stage 1's,
            # so no query mask gives s_{t-1} from the stage-t forward pass (it would need a second
            # pass under stage t-1's masks).
            raise ValueError("eta must be 0 with granularity 'weight': AML needs s_{t-1}, which weight-level "
                             "ownership cannot compute from the stage's forward pass")
        for name in ("batch_size", "later_stage_batch_size", "max_epochs", "later_stage_max_epochs",
                     "recovery_max_epochs", "patience", "min_output_units"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "patience" else 1)):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("temperature", "learning_rate", "later_stage_learning_rate"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (np.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if not 0.0 < self.recovery_fraction <= 1.0:
            raise ValueError(f"recovery_fraction must be in (0, 1], got {self.recovery_fraction}")
        if not all(np.isfinite(k) for k in self.fusion_weights):
            raise ValueError(f"fusion_weights must be finite, got {self.fusion_weights}")

    @property
    def num_stages(self) -> int:
        return len(self.objectives)

    def single_objective(self, objective: str) -> "TrainingConfig":
        """The same settings for an ordinary (one-stage) two-tower of ``objective``."""
        return dataclasses.replace(self, objectives=(objective,), tau=(), fusion_weights=(1.0,), reserve_tau=None)

    def cpp_after(self, stage: int) -> float | None:
        """The tau of the CPP that follows ``stage``: ``tau[stage-1]``, after the last stage ``reserve_tau``
        (None: no CPP follows)."""
        return self.tau[stage - 1] if stage < self.num_stages else self.reserve_tau

    def later_stages(self, stage: int) -> int:
        """The stages after ``stage`` that need room in every layer, the reserved one included."""
        return self.num_stages - stage + (self.reserve_tau is not None)

    def batch_size_for(self, stage: int) -> int:
        return self.batch_size if stage == 1 or self.later_stage_batch_size is None else self.later_stage_batch_size

    def learning_rate_for(self, stage: int) -> float:
        return (self.learning_rate if stage == 1 or self.later_stage_learning_rate is None
                else self.later_stage_learning_rate)

    def max_epochs_for(self, stage: int) -> int:
        return self.max_epochs if stage == 1 or self.later_stage_max_epochs is None else self.later_stage_max_epochs

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "TrainingConfig":
        values = dict(values)
        values["tower"] = TowerConfig(**{k: tuple(v) if isinstance(v, list) else v
                                         for k, v in values["tower"].items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_model(config: TrainingConfig, users: Catalog, items: Catalog,
                feature_kinds: dict[str, str], factorized_metrics: bool = True) -> CascadeTwoTower:
    """A fresh cascade model whose vocabularies cover ``users`` and ``items``.

    With ``factorized_metrics`` every task carries TFRS ``FactorizedTopK`` over the whole item corpus
    (computed by ``model.evaluate`` only, never during training).
    """
    candidates = None
    if factorized_metrics:
        candidates = tf.data.Dataset.from_tensor_slices(dict(items.as_inputs(ITEM_ID))).batch(1024)
    sparse = {"sparse_embeddings": config.sparse_embeddings, "weight_level": config.granularity == WEIGHT}
    user_tower = build_tower("user", USER_ID, users, feature_kinds, config.tower, seed=config.seed, **sparse)
    item_tower = build_tower("item", ITEM_ID, items, feature_kinds, config.tower, seed=config.seed + 1, **sparse)
    model = CascadeTwoTower(user_tower, item_tower, config.objectives, temperature=config.temperature,
                            eta=config.eta, remove_accidental_hits=config.remove_accidental_hits,
                            candidates=candidates, hard_negative_correction=config.hard_negative_correction)
    model.per_stage_forward = config.granularity == WEIGHT
    if parameter_servers.in_use():  # built in a ParameterServerStrategy scope: tables may be sharded
        parameter_servers.prepare_model(model.towers)
    model.set_stage(1)
    return model


def objective_dataset(train: InteractionTable | TFRecordSource, objective: str, items: Catalog,
                      config: TrainingConfig, stage: int, fraction: float = 1.0) -> tf.data.Dataset:
    """Stage ``stage``'s training batches of ``objective`` (in memory or streamed from shards); cascade
    hard negatives from stage 2 on when ``config.hard_negatives``."""
    hard_negatives = config.hard_negatives and stage > 1
    if isinstance(train, TFRecordSource):
        # Streaming from shards: same element format; the recovery subset is a keyed hash of the pairs.
        return train.objective_dataset(objective, config.batch_size_for(stage), shuffle=True,
                                       seed=config.seed + stage, item_catalog=items,
                                       hard_negatives=hard_negatives, fraction=fraction)
    rows = train
    if fraction < 1.0:
        rng = np.random.default_rng(config.seed + stage)
        rows = train.take(rng.random(len(train)) < fraction)
    return make_objective_dataset(rows, objective, config.batch_size_for(stage), shuffle=True,
                                  seed=config.seed + stage, item_catalog=items, hard_negatives=hard_negatives)


def fit_objective(model: CascadeTwoTower, train: InteractionTable | TFRecordSource, objective: str, items: Catalog,
                  validation: EvaluationData, config: TrainingConfig, max_epochs: int,
                  fraction: float = 1.0, verbose: int = 1, backup_dir: Path | None = None,
                  tensorboard_dir: Path | None = None, phase: str = "") -> dict:
    """One fit (:func:`csmf_tf.training.fit.fit_until_best`) of the current stage on ``objective``'s
    training positives, early-stopped on its validation Recall@50 (the model's current ``s_t``).

    ``train`` is an in-memory table or a :class:`~csmf_tf.data.streaming.TFRecordSource` (streamed
    from TFRecord shards every epoch; the rest of the stage loop is the same). ``verbose``: 0 silent,
    1 one line per epoch, 2 also Keras' progress bars; ``tensorboard_dir``: TensorBoard logs of the
    fit (None: none); ``phase``: a word for the epoch lines (e.g. ``"recovery"``).
    """
    stage = model.stage
    dataset, steps = objective_dataset(train, objective, items, config, stage, fraction), None
    if parameter_servers.in_use():  # every worker builds and reads its own copy of the batches
        dataset, steps = parameter_servers.per_worker_input(
            lambda: objective_dataset(train, objective, items, config, stage, fraction), dataset)
    label = f"stage {model.stage}/{model.num_stages} {objective}" + (f" {phase}" if phase else "")
    score = ValidationRecall(validation, (objective,), lambda m: current_vectors(m, validation, (objective,)),
                             verbose=bool(verbose), label=label)
    return fit_until_best(model, dataset, score, config.learning_rate_for(model.stage), max_epochs,
                          config.patience, config.start_is_candidate, backup_dir=backup_dir, verbose=verbose,
                          tensorboard_dir=tensorboard_dir, optimizer=config.optimizer, steps_per_epoch=steps)


def run_stage(stage: int, model: CascadeTwoTower, train: InteractionTable | TFRecordSource, items: Catalog,
              validation: EvaluationData, config: TrainingConfig, out_dir: Path, verbose: int = 1,
              trained: dict | None = None, tensorboard_dir: Path | None = None) -> dict:
    """Train stage ``stage`` of ``model`` (already holding stages ``< stage``) and checkpoint it.

    ``trained``: the ``fit_objective`` log of a training of this stage that ``model`` already holds
    (current stage ``stage``); the stage then starts at CPP. Lets several variants (ablations, sweeps)
    share one stage-1 pretraining. ``tensorboard_dir``: the stage's fits log to
    ``<tensorboard_dir>/stage_<t>`` (recovery: ``.../stage_<t>/recovery``) and the ownership map after
    the stage is added there as an image (None: no TensorBoard).
    """
    objective = config.objectives[stage - 1]
    board = Path(tensorboard_dir) / f"stage_{stage}" if tensorboard_dir is not None else None
    already = " (its training is done: from CPP on)" if trained is not None else ""
    print(f"== stage {stage}/{model.num_stages}: {objective}{already} ==", flush=True)
    backups = Path(out_dir) / ".backup"
    pruned = checkpoints.PRUNED_SUFFIX
    if checkpoints.has_stage(out_dir, stage, pruned):
        # Killed during recovery: resume from the pruned state instead of training again.
        log = checkpoints.load_stage(model, out_dir, stage, pruned)
        print(f"  resuming stage {stage} after CPP (its training and CPP are done)", flush=True)
    else:
        if trained is not None:
            if model.stage != stage:
                raise ValueError(f"a trained stage {stage} needs the model in stage {stage}, not {model.stage}")
            log = {"stage": stage, "train": trained}
        else:
            model.set_stage(stage, reinitialise=stage > 1, seed=config.seed + 1000 * stage,
                        zero_item_block=config.zero_item_block)
            log = {"stage": stage, "train": fit_objective(
                model, train, objective, items, validation, config, config.max_epochs_for(stage), verbose=verbose,
                backup_dir=backups / f"stage_{stage}_train", tensorboard_dir=board)}
        if config.cpp_after(stage) is not None:
            reports = selective_mask(model, stage, config.cpp_after(stage), config.granularity,
                                     config.min_output_units,
                                     random_seed=config.seed + stage if config.random_selection else None,
                                     later_stages=config.later_stages(stage))
            log["cpp"] = [r.as_dict() for r in reports]
            successor = config.objectives[stage] if stage < model.num_stages else "a later objective (reserved)"
            print_cpp(reports, objective, successor, config.cpp_after(stage))
            checkpoints.save_stage(model, out_dir, stage, config, log, pruned)
    if config.cpp_after(stage) is not None and config.recovery:
        print(f"  accuracy recovery on {config.recovery_fraction:.0%} of the {objective} data", flush=True)
        log["recovery"] = fit_objective(model, train, objective, items, validation, config,
                                        config.recovery_max_epochs, config.recovery_fraction, verbose,
                                        backup_dir=backups / f"stage_{stage}_recovery",
                                        tensorboard_dir=board / "recovery" if board is not None else None,
                                        phase="recovery")
    checkpoints.save_stage(model, out_dir, stage, config, log)
    if board is not None and model.num_stages > 1:
        from csmf_tf.plots import write_ownership_summary  # matplotlib only when TensorBoard is on
        write_ownership_summary(out_dir, board, stage)
    checkpoints.remove_stage(out_dir, stage, pruned)
    for phase in ("train", "recovery"):  # Keras leaves the emptied backup folders behind
        shutil.rmtree(backups / f"stage_{stage}_{phase}", ignore_errors=True)
    return log


def print_cpp(reports, objective: str, successor: str, tau: float) -> None:
    """A small table per stage transition: per layer, the units (or weights) CPP freed for the next
    stage and their share of the layer's information mass."""
    width = max([len(r.layer) for r in reports] + [5])
    unit = f"{reports[0].granularity if reports else 'unit'}s freed"
    print(f"  CPP (tau={tau:g}): {objective} hands to {successor}", flush=True)
    print(f"    {'layer':<{width}}  {unit:>13}  information", flush=True)
    for r in reports:
        print(f"    {r.layer:<{width}}  {f'{r.pruned}/{r.candidates}':>13}  "
              f"{r.information_freed / max(r.information_total, 1e-12):11.1%}", flush=True)


def run_cascade(model: CascadeTwoTower, train: InteractionTable | TFRecordSource, items: Catalog,
                validation: EvaluationData, config: TrainingConfig, out_dir: Path,
                stages: Sequence[int] | None = None, verbose: int = 1,
                tensorboard_dir: Path | None = None) -> list[dict]:
    """Run ``stages`` in order; stage ``t > 1`` starts from stage ``t-1``'s checkpoint.

    Without explicit ``stages`` the run is resumable: completed stages are loaded, not redone, and
    an interrupted stage continues from its last epoch backup. ``tensorboard_dir``: see
    :func:`run_stage`.
    """
    logs = []
    resume = stages is None
    for stage in stages or range(1, model.num_stages + 1):
        if resume and checkpoints.has_stage(out_dir, stage):
            checkpoints.check_same_config(out_dir, stage, config)
            print(f"== stage {stage}/{model.num_stages}: already complete, loading its checkpoint ==",
                  flush=True)
            logs.append(checkpoints.load_stage(model, out_dir, stage))
            continue
        if stage > 1:
            checkpoints.load_stage(model, out_dir, stage - 1)
        logs.append(run_stage(stage, model, train, items, validation, config, out_dir, verbose,
                              tensorboard_dir=tensorboard_dir))
    return logs
