"""Tune, train over seeds, evaluate once on test, sweep CSMF's knobs; returns one JSON-able dict.

Protocol (documented in docs/experiments.md):

1. **Tuning** on the first seed: every trained method gets the same grid (``Budget.grid``, learning
   rate x temperature) and picks the point with the best validation Recall@50, averaged over the
   objectives it serves (a single-objective tower: its own objective). Popularity has no knobs; the
   multi-head baselines also try each loss weighting at every grid point (``Method.points``).
   ``separate`` combines the single-objective towers, each at its own chosen point.
2. **Test**: each method's chosen run is evaluated on the test split, once.
3. **Seeds**: the chosen point is retrained with the other seeds and evaluated on test; every
   metric is reported as mean and sample standard deviation (``ddof = 1``) over the seeds.
4. **Sensitivity** (CSMF, first seed, chosen point): ``tau`` of every stage transition, ``eta``, and
   the fusion weights (no retraining: the fused query is recomputed from the same vectors).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Callable, Sequence

import numpy as np

from csmf_tf.experiments.methods import Context, HyperParams, Method, Trained, combine_parts, run_csmf
from csmf_tf.metrics.prior import PRIOR_GRID, log_popularity, tune_prior
from csmf_tf.metrics.vectors import KS, ScoringVectors, evaluate_vectors, mean_metric


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a mode fixes besides the base training configuration.

    ``grid``: the tuning grid (the same for every trained method); ``seeds``: the first one tunes;
    ``tau_values`` / ``eta_values``: sensitivity sweeps (empty: skipped); ``fusion_values``: values
    each fusion weight takes in turn while the others stay at the base weights; ``prior_grid``: the
    popularity prior's multiples (:mod:`csmf_tf.metrics.prior`) tried on validation for every learned
    method (empty: no prior).
    """

    grid: tuple[HyperParams, ...]
    seeds: tuple[int, ...]
    tau_values: tuple[float, ...] = ()
    eta_values: tuple[float, ...] = ()
    fusion_values: tuple[float, ...] = ()
    prior_grid: tuple[float, ...] = PRIOR_GRID

    def to_json(self) -> dict:
        return {"grid": [dataclasses.asdict(h) for h in self.grid], "seeds": list(self.seeds),
                "prior_grid": list(self.prior_grid),
                "tau_values": list(self.tau_values), "eta_values": list(self.eta_values),
                "fusion_values": list(self.fusion_values)}


class Progress:
    """Timestamped progress lines (minutes since the start)."""

    def __init__(self, printer: Callable[[str], None] = print):
        self.start = time.time()
        self.printer = printer

    def __call__(self, message: str) -> None:
        self.printer(f"[{(time.time() - self.start) / 60:6.1f} min] {message}")


def summarise(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}``; ``std`` is the sample standard deviation (0 for one value)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "n": int(len(array))}


def summarise_runs(runs: Sequence[dict]) -> dict:
    """Mean/std over seeds of every test metric (``stage`` and ``fused``) and of the training time."""
    out: dict = {}
    for part in ("stage", "fused"):
        keys = [k for k in runs[0]["test"].get(part, {}) if not k.endswith("num_users")]
        if keys:
            out[part] = {k: summarise([r["test"][part][k] for r in runs]) for k in keys}
    out["seconds"] = summarise([r["seconds"] for r in runs])
    return out


class Runner:
    """Runs ``methods`` under ``budget`` in ``context`` (see the module docstring)."""

    def __init__(self, context: Context, methods: Sequence[Method], budget: Budget,
                 progress: Progress | None = None):
        self.ctx, self.methods, self.budget = context, list(methods), budget
        self.progress = progress or Progress()
        self.weights = tuple(context.base.fusion_weights)
        self.by_name = {m.name: m for m in self.methods}
        for m in self.methods:
            for part in m.parts + ((m.same_runs_as,) if m.same_runs_as else ()):
                if part not in self.by_name:
                    raise ValueError(f"{m.name} uses {part!r}, which is not among the methods")
        data = context.data
        # The prior is on when the base configuration asks for it and the budget gives it a grid.
        self.log_pop = (log_popularity(data.train, context.objectives, data.items.ids)
                        if budget.prior_grid and context.base.popularity_prior else None)

    # ----- helpers ---------------------------------------------------------------------------------
    def _train(self, method: Method, hp: HyperParams, seed: int) -> Trained:
        start = time.time()
        trained = method.train(self.ctx, hp, seed)
        self.progress(f"seed {seed} {hp.key}: {method.name} trained in {time.time() - start:.0f} s "
                      f"({trained.parameters:,} parameters)")
        return trained

    def _select_on(self, method: Method) -> tuple[str, ...]:
        return method.select_on or self.ctx.objectives

    def _scored(self, method: Method, trained: Trained) -> ScoringVectors:
        """What ``method`` is scored with: the vectors, with the popularity prior tuned on validation
        when the method takes it (tuned once per training)."""
        if not (method.prior and self.log_pop is not None):
            return trained.vectors
        if trained.with_prior is None:
            trained.with_prior, trained.prior_alphas = tune_prior(
                trained.vectors, self.log_pop, self.ctx.data.validation, self.budget.prior_grid)
        return trained.with_prior

    def _record(self, method: Method, trained: Trained, hp: HyperParams | dict, seed: int, test: bool) -> dict:
        vectors = self._scored(method, trained)
        record = {"seed": seed, "hp": hp.key if isinstance(hp, HyperParams) else hp,
                  "seconds": trained.seconds, "parameters": trained.parameters,
                  "serving": vectors.serving(), "logs": trained.logs,
                  "prior_alphas": trained.prior_alphas if vectors is trained.with_prior else None,
                  "val": evaluate_vectors(vectors, self.ctx.data.validation, self.weights)}
        if test:
            record["test"] = evaluate_vectors(vectors, self.ctx.data.testing, self.weights)
        return record

    def _record_derived(self, runs: dict[str, list[dict]], trained_by_name: dict[str, Trained],
                        hp_of: Callable[[str], HyperParams | dict], seed: int) -> None:
        for method in self.methods:
            if method.same_runs_as in trained_by_name:
                runs[method.name].append(self._record(method, trained_by_name[method.same_runs_as],
                                                      hp_of(method.same_runs_as), seed, test=True))

    def _combine(self, method: Method, parts: dict[str, Trained]) -> Trained:
        return combine_parts([parts[p] for p in method.parts], self.ctx.objectives)

    # ----- the protocol ----------------------------------------------------------------------------
    def run(self) -> dict:
        trained_methods = [m for m in self.methods if m.train is not None]
        composites = [m for m in self.methods if m.parts]
        first, later = self.budget.seeds[0], self.budget.seeds[1:]

        # 1. tuning on the first seed: keep each method's best run (vectors) and every grid score.
        tuning: dict[str, dict[str, float]] = {m.name: {} for m in trained_methods}
        best: dict[str, tuple[float, HyperParams, Trained]] = {}
        for index, hp in enumerate(self.budget.grid):
            self.progress(f"tuning point {index + 1}/{len(self.budget.grid)}: {hp.key}")
            for method in trained_methods:
                if not method.tuned and index > 0:
                    continue
                for point in method.points(hp):
                    trained = self._train(method, point, first)
                    val = evaluate_vectors(self._scored(method, trained), self.ctx.data.validation,
                                           ks=(50,))["stage"]
                    score = mean_metric(val, self._select_on(method))
                    tuning[method.name][point.key] = score
                    if method.name not in best or score > best[method.name][0]:
                        best[method.name] = (score, point, trained)
        chosen = {name: hp for name, (_, hp, _) in best.items()}
        self._drop_unchosen_runs(chosen, first)

        # 2. test once, first seed, chosen points.
        runs: dict[str, list[dict]] = {m.name: [] for m in self.methods}
        first_vectors: dict[str, Trained] = {}
        for method in trained_methods:
            _, hp, trained = best[method.name]
            runs[method.name].append(self._record(method, trained, hp, first, test=True))
            first_vectors[method.name] = trained
        for method in composites:
            trained = self._combine(method, first_vectors)
            first_vectors[method.name] = trained
            runs[method.name].append(self._record(method, trained, self._part_points(method, chosen), first, True))
        self._record_derived(runs, first_vectors, lambda name: self._point(name, chosen), first)
        self.progress("tuning done; chosen: " + ", ".join(f"{k}: {v.key}" for k, v in chosen.items()))

        # 3. later seeds at the chosen points (grouped by point so the stage-1 pretraining is shared).
        for seed in later:
            seed_runs: dict[str, Trained] = {}
            for hp in dict.fromkeys(chosen.values()):
                for method in trained_methods:
                    if chosen[method.name] == hp:
                        seed_runs[method.name] = trained = self._train(method, hp, seed)
                        runs[method.name].append(self._record(method, trained, hp, seed, test=True))
                self.ctx.forget_pretrained(keep=[(h, first) for h in self.budget.grid])
            for method in composites:
                seed_runs[method.name] = trained = self._combine(method, seed_runs)
                runs[method.name].append(self._record(method, trained, self._part_points(method, chosen), seed, True))
            self._record_derived(runs, seed_runs, lambda name: self._point(name, chosen), seed)
            self.progress(f"seed {seed} done")

        # 4. sensitivity of CSMF (first seed, its chosen point).
        sensitivity = self._sensitivity(chosen, first, first_vectors) if "csmf" in chosen else {}
        self.ctx.forget_pretrained()
        for path in self.ctx.kept_runs.values():
            shutil.rmtree(path, ignore_errors=True)

        methods = {}
        for method in self.methods:
            source = method.same_runs_as or method.name
            point = self._point(source, chosen)
            methods[method.name] = {
                "label": method.label, "family": method.family, "description": method.description,
                "chosen": point.key if isinstance(point, HyperParams) else point,
                "popularity_prior": bool(method.prior and self.log_pop is not None),
                "tuning": tuning.get(source, {}),
                "select_on": list(self._select_on(self.by_name[source])),
                "parameters": runs[method.name][0]["parameters"],
                "serving": runs[method.name][0]["serving"],
                "runs": runs[method.name],
                "summary": summarise_runs(runs[method.name]),
            }
        return {"methods": methods, "sensitivity": sensitivity, "fusion_weights": list(self.weights),
                "ks": list(KS)}

    def _part_points(self, method: Method, chosen: dict[str, HyperParams]) -> dict[str, str]:
        return {p: chosen[p].key for p in method.parts}

    def _point(self, name: str, chosen: dict[str, HyperParams]) -> HyperParams | dict | None:
        """The chosen grid point of method ``name`` (composites: their parts'; untuned: None)."""
        method = self.by_name[name]
        if method.parts:
            return self._part_points(method, chosen)
        return chosen[name] if name in chosen and method.tuned else None

    def _drop_unchosen_runs(self, chosen: dict[str, HyperParams], seed: int) -> None:
        for (name, hp, run_seed), path in list(self.ctx.kept_runs.items()):
            if run_seed != seed or chosen.get(name) != hp:
                shutil.rmtree(path, ignore_errors=True)
                del self.ctx.kept_runs[(name, hp, run_seed)]

    # ----- sensitivity -----------------------------------------------------------------------------
    def _sweep_point(self, hp: HyperParams, seed: int, name: str, **kwargs) -> dict:
        trained = run_csmf(self.ctx, hp, seed, name, **kwargs)
        vectors = self._scored(self.by_name["csmf"], trained)
        return {"val": evaluate_vectors(vectors, self.ctx.data.validation, self.weights)["stage"],
                "test": evaluate_vectors(vectors, self.ctx.data.testing, self.weights),
                "seconds": trained.seconds}

    def _sensitivity(self, chosen: dict[str, HyperParams], seed: int, vectors: dict[str, Trained]) -> dict:
        hp = chosen["csmf"]
        base = self.ctx.base
        source = self.ctx.kept_runs.get(("csmf", hp, seed))
        scored = self._scored(self.by_name["csmf"], vectors["csmf"])
        main = {"val": evaluate_vectors(scored, self.ctx.data.validation, self.weights)["stage"],
                "test": evaluate_vectors(scored, self.ctx.data.testing, self.weights)}
        out: dict = {"hp": hp.key, "seed": seed, "base_tau": list(base.tau), "base_eta": base.eta}
        stages = len(self.ctx.objectives)
        if self.budget.tau_values and stages > 1:
            out["tau"] = {}
            for transition in range(1, stages):
                points = []
                for value in self.budget.tau_values:
                    taus = list(base.tau)
                    taus[transition - 1] = value
                    if np.isclose(value, base.tau[transition - 1]):
                        point = main
                    else:
                        point = self._sweep_point(hp, seed, f"sweep_tau{transition}", tau=tuple(taus),
                                                  from_stage=transition, source=source)
                    points.append({"value": value, **point})
                    self.progress(f"sweep tau_{transition} = {value:g} done")
                out["tau"][str(transition)] = points
        if self.budget.eta_values and stages > 1:
            points = []
            for value in self.budget.eta_values:
                point = main if np.isclose(value, base.eta) else self._sweep_point(
                    hp, seed, "sweep_eta", eta=value, from_stage=2, source=source)
                points.append({"value": value, **point})
                self.progress(f"sweep eta = {value:g} done")
            out["eta"] = points
        if self.budget.fusion_values and stages > 1:
            out["fusion"] = self._fusion_sweep(vectors)
        return out

    def _fusion_sweep(self, vectors: dict[str, Trained]) -> dict:
        """Recall@50 / NDCG@50 of every objective under the fused ranking as one weight varies."""
        compared = [name for name in ("csmf", "separate", "shared_bottom") if name in vectors]
        out = {}
        for index, objective in enumerate(self.ctx.objectives):
            rows = []
            for value in self.budget.fusion_values:
                weights = list(self.weights)
                weights[index] = value
                row = {"value": value, "weights": weights}
                for name in compared:
                    fused = evaluate_vectors(self._scored(self.by_name[name], vectors[name]), self.ctx.data.testing, weights,
                                             ks=(50,))["fused"]
                    row[name] = fused
                rows.append(row)
            out[objective] = rows
        self.progress("fusion-weight sweep done")
        return out
