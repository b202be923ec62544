"""Fusion weights chosen on validation: every point of a grid over the simplex, scored against a target.

The fused ranking of weights ``k`` is ``F = sum_t k_t s_t`` (:mod:`csmf_tf.scoring`; with the popularity
prior the query is ``[u * w, k * alpha]``). ``F`` is linear in ``k`` and a ranking does not change when
``F`` is multiplied by a positive number, so the simplex ``{k_t >= 0, sum_t k_t = 1}`` holds every
ranking that non-negative weights can give. :func:`simplex_grid` lays a regular grid on it
(``k_t = n_t / steps``); :func:`search_fusion_weights` scores every point with the project's one
evaluator (:func:`~csmf_tf.metrics.vectors.evaluate_vectors`) and keeps the best point that meets the
constraints (ties: the first in grid order).

A target (:func:`parse_target`) is one of

- a **weighted sum** of fused metrics, ``"1*exposure/ndcg@50 + 1*click/ndcg@50 + 2*conversion/ndcg@50"``
  (a term without ``<c>*`` counts once), maximised;
- **one metric** maximised subject to **constraints**, each ``"<objective>/<metric> >= <bound>"`` where the
  bound is a number (``>= 0.30``) or a fraction of what the objective's own stage score ``s_t`` ranks to
  on the same split (``>= 0.95*stage``): e.g. maximise ``conversion/recall@50`` while the fused ranking
  keeps ``exposure/recall@50 >= 0.95 x`` what exposure's own stage gives.

Constraints may be combined with a weighted sum as well. Metrics are ``recall@K`` or ``ndcg@K``.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Sequence

import numpy as np

from csmf_tf.metrics.protocol import EvaluationData
from csmf_tf.metrics.vectors import ScoringVectors, evaluate_vectors

_METRIC = r"(?P<objective>[^\s/*+<>=]+)/(?P<metric>(?:recall|ndcg)@(?P<k>[1-9][0-9]*))"
_TERM = re.compile(rf"^\s*(?:(?P<coefficient>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?{_METRIC}\s*$")
_CONSTRAINT = re.compile(rf"^\s*{_METRIC}\s*>=\s*(?P<bound>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
                         r"\s*(?P<relative>\*\s*stage)?\s*$")
TARGET_SYNTAX = ("a target is '<objective>/<metric>' or a weighted sum '<c>*<objective>/<metric> + ...' "
                 "(metric recall@K or ndcg@K, c >= 0)")
CONSTRAINT_SYNTAX = ("a constraint is '<objective>/<metric> >= <number>' or '<objective>/<metric> >= "
                     "<fraction>*stage' (at least that fraction of the objective's own stage score's metric)")


@dataclasses.dataclass(frozen=True)
class Term:
    """``coefficient x`` the fused ranking's ``metric`` on ``objective``."""

    objective: str
    metric: str
    coefficient: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.objective}/{self.metric}"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """The fused ranking's ``objective/metric`` must be at least ``bound`` (``relative``: ``bound`` times
    the same metric of the objective's own stage score)."""

    objective: str
    metric: str
    bound: float
    relative: bool

    @property
    def key(self) -> str:
        return f"{self.objective}/{self.metric}"

    def threshold(self, stage: dict[str, float]) -> float:
        return self.bound * stage[self.key] if self.relative else self.bound

    def describe(self) -> str:
        return f"{self.key} >= {self.bound:g}" + ("*stage" if self.relative else "")


@dataclasses.dataclass(frozen=True)
class FusionTarget:
    """Maximise ``sum(term)`` subject to every constraint."""

    terms: tuple[Term, ...]
    constraints: tuple[Constraint, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every ``objective/metric`` the target reads, in order of first mention."""
        return tuple(dict.fromkeys([t.key for t in self.terms] + [c.key for c in self.constraints]))

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(sorted({int(key.rsplit("@", 1)[1]) for key in self.keys}))

    def value(self, fused: dict[str, float]) -> float:
        return float(sum(t.coefficient * fused[t.key] for t in self.terms))

    def describe(self) -> str:
        goal = " + ".join(f"{t.coefficient:g}*{t.key}" if t.coefficient != 1.0 else t.key for t in self.terms)
        return f"maximise {goal}" + ("".join(f"; {c.describe()}" for c in self.constraints))


def parse_target(maximise: str, constraints: Sequence[str] = (), objectives: Sequence[str] | None = None
                 ) -> FusionTarget:
    """The target of a ``--maximise`` string and ``--constraint`` strings (syntax: module docstring).

    ``objectives``: the model's objectives; a metric of any other objective is refused. Raises
    ``ValueError`` naming the part that does not parse and the expected syntax.
    """
    terms = []
    for part in maximise.split("+"):
        match = _TERM.match(part)
        if match is None:
            raise ValueError(f"cannot read {part.strip()!r} of the target {maximise!r}; {TARGET_SYNTAX}")
        coefficient = float(match["coefficient"]) if match["coefficient"] is not None else 1.0
        terms.append(Term(match["objective"], match["metric"], coefficient))
    parsed = []
    for text in constraints:
        match = _CONSTRAINT.match(text)
        if match is None:
            raise ValueError(f"cannot read the constraint {text!r}; {CONSTRAINT_SYNTAX}")
        parsed.append(Constraint(match["objective"], match["metric"], float(match["bound"]),
                                 match["relative"] is not None))
    target = FusionTarget(tuple(terms), tuple(parsed))
    if objectives is not None:
        unknown = sorted({key.split("/")[0] for key in target.keys} - set(objectives))
        if unknown:
            raise ValueError(f"the target names objective(s) {unknown}; the model's objectives are "
                             f"{', '.join(objectives)}")
    if all(t.coefficient == 0.0 for t in terms):
        raise ValueError(f"the target {maximise!r} has only zero coefficients: every point would tie")
    return target


def simplex_grid(num_objectives: int, steps: int) -> np.ndarray:
    """Every ``k`` with ``k_t = n_t / steps``, ``n_t >= 0`` integers summing to ``steps``; ``[P, S]``,
    ``P = C(steps + S - 1, S - 1)``, in lexicographic order of ``n`` (largest ``k_1`` first)."""
    if num_objectives < 1 or steps < 1:
        raise ValueError(f"need at least one objective and one step, got {num_objectives} and {steps}")
    points = [n + (steps - sum(n),) for n in itertools.product(range(steps, -1, -1), repeat=num_objectives - 1)
              if sum(n) <= steps]
    return np.asarray(points, np.float64) / steps


@dataclasses.dataclass
class FusionSearch:
    """Every searched point: its weights, the fused metrics the target reads, value and feasibility
    (``chosen``: the best feasible point's index, -1 when none is feasible)."""

    target: FusionTarget
    objectives: tuple[str, ...]
    weights: np.ndarray                 # [P, S]
    fused: list[dict[str, float]]       # per point: {"<objective>/<metric>": value}
    values: np.ndarray                  # [P] target value
    feasible: np.ndarray                # [P] bool
    stage: dict[str, float]             # each objective ranked by its own stage score (same split)
    thresholds: dict[str, float]        # constraint -> the bound it resolved to
    chosen: int                         # index of the best feasible point

    @property
    def chosen_weights(self) -> tuple[float, ...] | None:
        return tuple(float(k) for k in self.weights[self.chosen]) if self.chosen >= 0 else None

    def to_json(self) -> dict:
        found = self.chosen >= 0
        return {"target": self.target.describe(), "objectives": list(self.objectives),
                "chosen_weights": list(self.chosen_weights) if found else None,
                "chosen_value": float(self.values[self.chosen]) if found else None,
                "chosen_metrics": self.fused[self.chosen] if found else None, "stage_metrics": self.stage,
                "constraint_thresholds": self.thresholds,
                "points": [{"weights": [float(k) for k in w], "value": float(v), "feasible": bool(f), "metrics": m}
                           for w, v, f, m in zip(self.weights, self.values, self.feasible, self.fused)]}


class NoFeasiblePointError(ValueError):
    """No searched point meets the constraints; ``search`` holds every point (chosen = -1)."""

    def __init__(self, message: str, search: FusionSearch):
        super().__init__(message)
        self.search = search


def fused_metrics(vectors: ScoringVectors, data: EvaluationData, weights: Sequence[float],
                  keys: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
    """``{key: value}`` of the fused ranking of ``weights`` for the ``objective/metric`` keys."""
    query, items = vectors.fused(weights)
    objectives = tuple(dict.fromkeys(key.split("/")[0] for key in keys))
    ranked = evaluate_vectors(ScoringVectors(objectives, [query] * len(objectives), [items] * len(objectives)),
                              data, ks=ks)["stage"]
    return {key: ranked[key] for key in keys}


def search_fusion_weights(vectors: ScoringVectors, data: EvaluationData, target: FusionTarget,
                          steps: int = 10) -> FusionSearch:
    """Score every point of :func:`simplex_grid` on ``data`` (a validation split) and choose the best
    feasible one. Raises :class:`NoFeasiblePointError` when none meets the constraints."""
    missing = sorted({key.split("/")[0] for key in target.keys} - set(data.eval_sets))
    if missing:
        raise ValueError(f"the split has no positives of objective(s) {missing}: the target cannot be measured")
    ks = target.ks
    biggest = max(ks)
    if biggest > vectors.items[0].shape[0]:
        raise ValueError(f"K={biggest} of the target exceeds the {vectors.items[0].shape[0]} items")
    stage = {key: value for key, value in evaluate_vectors(vectors, data, ks=ks)["stage"].items()
             if key in target.keys}
    thresholds = {c.describe(): c.threshold(stage) for c in target.constraints}
    grid = simplex_grid(len(vectors.objectives), steps)
    fused = [fused_metrics(vectors, data, k, target.keys, ks) for k in grid]
    values = np.array([target.value(m) for m in fused])
    feasible = np.array([all(m[c.key] >= thresholds[c.describe()] for c in target.constraints) for m in fused],
                        bool)
    search = FusionSearch(target, tuple(vectors.objectives), grid, fused, values, feasible, stage, thresholds, -1)
    if not feasible.any():
        best = {c.describe(): max(m[c.key] for m in fused) for c in target.constraints}
        raise NoFeasiblePointError(
            f"no point of the {len(grid)}-point grid meets the constraints ({target.describe()}); thresholds "
            f"{thresholds}, best reached {best}; loosen a constraint or use more --steps", search)
    candidates = np.where(feasible, values, -np.inf)
    search.chosen = int(np.argmax(candidates))   # the first of equal maxima
    return search
