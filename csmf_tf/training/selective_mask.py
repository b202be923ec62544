"""Apply CPP to a trained stage: move its low-information units (or weights) to the next stage.

Unit level (default): every embedding table and hidden Dense layer of each tower is one CPP layer;
the output layer is one CPP layer shared by both towers (an output dimension is one unit of the
pair, and its information value is the user-side plus the item-side L1 mass). Guard rails: the
stage keeps at least one unit per layer, and frees at least one unit per later stage per layer
(``min_output_units`` per later stage in the output layer), so every later stage has room.

Weight level (ablation): every weight tensor is one CPP layer, the element is ``|w|``.
"""
from __future__ import annotations

import numpy as np

from csmf_tf.masks import ownership
from csmf_tf.masks.cpp import LayerReport, apply_guard_rails, cpp_prune
from csmf_tf.models.cascade import CascadeTwoTower

UNIT, WEIGHT = "unit", "weight"


def unit_information(layer, stage: int) -> np.ndarray:
    """L1 norm of each unit's active incoming weights (a column of the kernel or embedding table)."""
    return layer.active_column_l1(stage)


def _units_per_stage(owner: np.ndarray) -> dict[int, int]:
    stages, counts = np.unique(owner[owner != ownership.NEVER], return_counts=True)
    return {int(s): int(c) for s, c in zip(stages, counts)}


def _select(information: np.ndarray, tau: float, min_free: int, rng: np.random.Generator | None) -> np.ndarray:
    """CPP with guard rails; with ``rng``, the ablation "without CPP": as many elements, at random."""
    pruned = apply_guard_rails(cpp_prune(information, tau), information, min_keep=1, min_free=min_free)
    if rng is None:
        return pruned
    random = np.zeros_like(pruned)
    random[rng.choice(pruned.size, int(pruned.sum()), replace=False)] = True
    return random


def _free_units(name: str, layers: list, stage: int, tau: float, min_free: int,
                rng: np.random.Generator | None) -> LayerReport:
    information = sum(unit_information(layer, stage) for layer in layers)
    candidates = np.flatnonzero(layers[0].units_of(stage))
    pruned = _select(information[candidates], tau, min_free, rng)
    owner = ownership.hand_off(layers[0].unit_owner.numpy(), candidates[pruned], stage)
    for layer in layers:
        layer.unit_owner.assign(owner)
    return LayerReport(name, UNIT, len(candidates), int(pruned.sum()),
                       float(information[candidates].sum()),
                       float(information[candidates][pruned].sum()), _units_per_stage(owner))


def _free_weights(layer, stage: int, tau: float, min_free: int,
                  rng: np.random.Generator | None) -> LayerReport:
    magnitude = np.abs(layer.owned_weight.numpy())
    candidates = np.flatnonzero(layer.weights_of(stage))
    values = magnitude.ravel()[candidates]
    pruned = _select(values, tau, min_free, rng)
    owner = ownership.hand_off(layer.weight_owner.numpy(), candidates[pruned], stage)
    layer.weight_owner.assign(owner)
    return LayerReport(layer.name, WEIGHT, len(candidates), int(pruned.sum()), float(values.sum()),
                       float(values[pruned].sum()), _units_per_stage(owner))


def selective_mask(model: CascadeTwoTower, stage: int, tau: float, granularity: str = UNIT,
                   min_output_units: int = 4, random_seed: int | None = None,
                   later_stages: int | None = None) -> list[LayerReport]:
    """Run CPP on ``stage``'s parameters, hand the pruned ones to ``stage + 1`` and re-mask.

    ``random_seed`` switches to the "without CPP" ablation: per layer, the same number of elements
    as CPP would free, chosen uniformly at random.

    Afterwards the model is still in ``stage`` (the freed parameters are zero and inactive), ready
    for accuracy recovery. Returns one report per CPP layer.

    ``later_stages``: how many stages after ``stage`` need room in every layer (default: the model's
    remaining stages; one more when capacity is reserved for an objective added later).
    """
    later_stages = model.num_stages - stage if later_stages is None else later_stages
    if later_stages < 1:
        raise ValueError(f"stage {stage} is the last of {model.num_stages}: nothing follows to free for")
    rng = None if random_seed is None else np.random.default_rng(random_seed)
    reports = []
    if granularity == UNIT:
        for tower in model.towers:
            for wrapper in tower.embeddings + tower.dense[:-1]:
                reports.append(_free_units(wrapper.layer.name, [wrapper.layer], stage, tau,
                                           min_free=later_stages, rng=rng))
        reports.append(_free_units("output", [t.output_layer for t in model.towers], stage, tau,
                                   min_free=later_stages * min_output_units, rng=rng))
        for tower in model.towers:
            tower.sync_weight_owners()
    elif granularity == WEIGHT:
        for tower in model.towers:
            for wrapper in tower.wrappers:
                reports.append(_free_weights(wrapper.layer, stage, tau, min_free=later_stages, rng=rng))
    else:
        raise ValueError(f"granularity must be {UNIT!r} or {WEIGHT!r}, got {granularity!r}")
    model.set_stage(stage)
    return reports
