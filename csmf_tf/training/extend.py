"""Add an objective to a trained cascade without retraining or changing any of its stages.

A run trained with ``TrainingConfig.reserve_tau`` ends with one more CPP: after its last stage ``S``, the
units with the least information move to stage ``S + 1``, which no objective owns yet. They are inactive
(exactly zero, left out of the export: :mod:`csmf_tf.serving.reserved`), so the model serves ``S``
objectives as before. :func:`extend_csmf` later trains stage ``S + 1`` on a new objective: the model is
built with the ``S + 1`` objectives, loaded from the run's last checkpoint, and the new stage begins as
any stage does (:func:`~csmf_tf.training.stages.run_stage`: its units re-initialised, its item block at
zero, one fit early-stopped on the new objective's validation Recall@50). The ownership rules
(:mod:`csmf_tf.masks.ownership`) then guarantee what an extension promises:

- every parameter of stages ``1..S`` is bit-identical afterwards (only ``o(w) = S + 1`` gets gradients;
  checked again here before anything is written);
- every existing objective's score ``s_t`` is unchanged: an output dimension of stage ``b <= S`` reads
  only units of stages ``<= b`` (``W[i -> j]`` with ``s(i) > s(j)`` is never active), and the popularity
  prior keeps the base run's ``alpha_t`` for ``t <= S`` (only the new objective's is tuned).

The extension's folder is a run like any other (``stage_<t>/`` checkpoints, ``results.json``, ``bundle/``,
pictures, plus ``extension.json``): stages ``1..S`` are copies of the base run's checkpoints, so it can be
exported, searched for fusion weights (:mod:`pipelines.tune_fusion`) or extended again when it reserved
capacity itself (``reserve_tau``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from csmf_tf.data.prepared import PreparedData
from csmf_tf.models.cascade import CascadeTwoTower
from csmf_tf.training import checkpoints
from csmf_tf.training.evaluation import cascade_vectors
from csmf_tf.training.run import TrainedRun, load_run, score_and_save
from csmf_tf.training.stages import TrainingConfig, build_model, run_stage

EXTENSION_FILE = "extension.json"


def extended_config(base: TrainingConfig, objective: str, reserve_tau: float | None = None,
                    fusion_weight: float = 1.0) -> TrainingConfig:
    """``base`` with ``objective`` as stage ``S + 1``: the reserve's CPP becomes the transition ``S -> S + 1``;
    ``reserve_tau`` reserves again for the objective after it (None: no reserve)."""
    if base.reserve_tau is None:
        raise ValueError(f"the run reserved no capacity for a later objective (trained without reserve_tau); "
                         f"retrain it with reserve_tau (--reserve-tau) to extend it by {objective!r}")
    if objective in base.objectives:
        raise ValueError(f"objective {objective!r} is already stage {base.objectives.index(objective) + 1} "
                         f"of {base.objectives}")
    return dataclasses.replace(base, objectives=(*base.objectives, objective), tau=(*base.tau, base.reserve_tau),
                               reserve_tau=reserve_tau, fusion_weights=(*base.fusion_weights, fusion_weight))


def reserved_units(model: CascadeTwoTower, stage: int) -> dict[str, int]:
    """Units of every CPP layer that ``stage`` owns (``{layer: count}``; the output layer once)."""
    counts = {}
    for tower in model.towers:
        for wrapper in tower.embeddings + tower.dense[:-1]:
            counts[wrapper.layer.name] = int(wrapper.layer.units_of(stage).sum())
    counts["output"] = int(model.user_tower.output_layer.units_of(stage).sum())
    return counts


def frozen_parameters_changed(before: CascadeTwoTower, after: CascadeTwoTower, stages: int) -> list[str]:
    """Names of the masked layers where a weight or bias owned by a stage ``<= stages`` differs (bitwise)."""
    changed = []
    for old_tower, new_tower in zip(before.towers, after.towers):
        for old, new in zip(old_tower.wrappers, new_tower.wrappers):
            old_layer, new_layer = old.layer, new.layer
            kept = old_layer.weight_owner.numpy() <= stages
            if not np.array_equal(old_layer.owned_weight.numpy()[kept], new_layer.owned_weight.numpy()[kept]):
                changed.append(new_layer.name)
            elif hasattr(old_layer, "bias"):
                units = old_layer.unit_owner.numpy() <= stages
                if not np.array_equal(old_layer.bias.numpy()[units], new_layer.bias.numpy()[units]):
                    changed.append(new_layer.name)
    return changed


def extend_csmf(data: PreparedData, base_dir: Path, objective: str, out_dir: Path,
                reserve_tau: float | None = None, fusion_weight: float = 1.0, verbose: int = 1,
                tensorboard_dir: Path | None = None) -> TrainedRun:
    """Train ``objective`` as stage ``S + 1`` of the finished run in ``base_dir`` into ``out_dir``, then
    score and save it like :func:`~csmf_tf.training.run.train_csmf` (``results.json``, ``bundle/``, ...).

    ``data``: the base run's data (same catalogs), holding ``objective`` after the base's objectives in its
    cascade order. The training settings are the base run's (recorded in its checkpoints), so the new
    stage gets the budget a from-the-start cascade gives its last stage. ``reserve_tau``: reserve capacity
    again, for the objective after this one. Resumable: a finished extension in ``out_dir`` is loaded, an
    interrupted one continues (:func:`~csmf_tf.training.stages.run_stage`).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"the extension needs its own folder; {out_dir} is the base run")
    base = load_run(base_dir, data)
    base_config = TrainingConfig.from_json(json.loads(
        (checkpoints.stage_dir(base_dir, base.model.num_stages) / "config.json").read_text()))
    config = extended_config(base_config, objective, reserve_tau, fusion_weight)
    _check_data(data, config)
    stage = config.num_stages
    free = reserved_units(base.model, stage)
    if not all(free.values()):
        raise ValueError(f"{base_dir} reserved no unit in layer(s) {[k for k, v in free.items() if not v]}")
    record = {"base": str(base_dir), "base_objectives": list(base_config.objectives), "objective": objective,
              "reserved_units": free, "kept_prior_alphas": base.results.get("prior_alphas", [])[:stage - 1],
              "config": config.to_json()}
    _claim(out_dir, base_dir, stage, record)
    model = build_model(config, data.users, data.items, data.table.feature_kinds)
    if checkpoints.has_stage(out_dir, stage):
        checkpoints.check_same_config(out_dir, stage, config)
        print(f"== stage {stage}/{stage}: {objective} already added, loading its checkpoint ==", flush=True)
        checkpoints.load_stage(model, out_dir, stage)
    else:
        checkpoints.load_stage(model, out_dir, stage - 1)
        run_stage(stage, model, data.train, data.items, data.validation, config, out_dir, verbose,
                  tensorboard_dir=tensorboard_dir)
    changed = frozen_parameters_changed(base.model, model, stage - 1)
    if changed:  # cannot happen while the ownership rules hold; never publish a run that breaks them
        raise RuntimeError(f"extending by {objective!r} changed parameters of stages 1..{stage - 1} in {changed}")
    test = cascade_vectors(model, data.testing, data.table.objectives)
    validation = cascade_vectors(model, data.validation, data.table.objectives)
    run = score_and_save(model, data, config, out_dir, test, validation, kept_alphas=record["kept_prior_alphas"])
    (out_dir / EXTENSION_FILE).write_text(json.dumps({**record, "frozen_parameters_identical": True}, indent=2))
    return run


def _check_data(data: PreparedData, config: TrainingConfig) -> None:
    """The objectives must be a prefix of the data's cascade: stage ``t`` is scored as objective ``t``,
    and the new stage's hard negatives are its predecessor's positives."""
    expected = tuple(data.table.objectives[:config.num_stages])
    if expected != config.objectives:
        raise ValueError(f"the data's objectives are {', '.join(data.table.objectives)}; extending "
                         f"{', '.join(config.objectives[:-1])} needs {config.objectives[-1]!r} next in that order")
    for split, evaluation in (("validation", data.validation), ("test", data.testing)):
        if config.objectives[-1] not in evaluation.eval_sets:
            raise ValueError(f"objective {config.objectives[-1]!r} has no positives in the {split} split")


def _claim(out_dir: Path, base_dir: Path, stage: int, record: dict) -> None:
    """Make ``out_dir`` this extension's folder: copies of the base's stage checkpoints ``1..stage-1``.

    A folder that already holds another run (or another extension) is refused.
    """
    marker = out_dir / EXTENSION_FILE
    if marker.exists():
        previous = json.loads(marker.read_text())
        if {k: previous.get(k) for k in ("base", "objective", "config")} != {
                k: json.loads(json.dumps(record[k])) for k in ("base", "objective", "config")}:
            raise ValueError(f"{out_dir} holds another extension ({previous['objective']!r} of "
                             f"{previous['base']}); use another --out")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; an extension writes a new run folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for earlier in range(1, stage):
        shutil.copytree(checkpoints.stage_dir(base_dir, earlier), checkpoints.stage_dir(out_dir, earlier))
    marker.write_text(json.dumps(record, indent=2))
