"""Adding an objective later against training every objective from the start (``pipelines.extend_study``).

Per seed, on the same prepared data and with the same training configuration (the same fits, epochs,
early stopping and CPP thresholds: the same budget), for objectives ``o_1..o_S``:

- ``from_start``: the cascade ``o_1 -> ... -> o_S`` (:func:`~csmf_tf.training.run.train_csmf`);
- ``extended``: the cascade ``o_1 -> ... -> o_{S-1}`` with capacity reserved after its last stage
  (``reserve_tau`` = the tau ``from_start`` applies at that transition), then ``o_S`` added to it
  (:func:`~csmf_tf.training.extend.extend_csmf`);
- ``reserved_base``: the model ``extended`` starts from, as it is served before the extension;
- ``no_reserve``: the shorter cascade without a reserve (what reserving costs the objectives served
  before the extension).

Stage 1 is the same fit in every variant (same data, towers, seed and optimizer), so it is trained once per
seed, as the single-objective two-tower of ``o_1`` (as the main job does), and every variant continues
from it at its own CPP (:func:`~csmf_tf.training.run.train_csmf` with ``pretrained=``); its time is counted
in every variant's. Every model is scored the way every run is (:func:`~csmf_tf.training.run.score_and_save`: the project's
evaluator on the test split, the popularity prior tuned on validation). The report also checks, per seed,
that the extension left the scores of ``o_1..o_{S-1}`` exactly as ``reserved_base`` served them.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

from csmf_tf.data.prepared import PreparedData
from csmf_tf.experiments.report import metric_table, rounded
from csmf_tf.experiments.runner import summarise, summarise_runs
from csmf_tf.training.extend import extend_csmf
from csmf_tf.training.run import train_csmf
from csmf_tf.training.stages import TrainingConfig

LABELS = {"from_start": "all objectives from the start",
          "extended": "extended: last objective added later",
          "reserved_base": "before the extension (reserve held back)",
          "no_reserve": "shorter cascade, no reserve"}


class _Clock:
    """Wall-clock and CPU seconds (every thread of this process) since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.time(), time.process_time()

    def spent(self) -> dict[str, float]:
        return {"seconds": time.time() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def shorter_config(config: TrainingConfig, reserve: bool) -> TrainingConfig:
    """``config`` without its last objective; with ``reserve`` the last transition's tau reserves capacity."""
    return dataclasses.replace(config, objectives=config.objectives[:-1], tau=config.tau[:-1],
                               fusion_weights=config.fusion_weights[:-1],
                               reserve_tau=config.tau[-1] if reserve else None)


def run_extension_study(data: PreparedData, config: TrainingConfig, work_dir: Path, seeds: Sequence[int] = (0, 1, 2),
                        verbose: int = 0, progress: Callable[[str], None] = print) -> dict:
    """Train every variant (module docstring) for each seed under ``work_dir/seed_<s>/`` (resumable: finished
    runs are loaded) and return the study: per variant, the per-seed test results, seconds and their
    mean/std, plus the exactness check of the extension."""
    if config.num_stages < 2:
        raise ValueError(f"the study adds the last of at least two objectives, got {config.objectives}")
    work_dir = Path(work_dir)
    runs: dict[str, list[dict]] = {name: [] for name in LABELS}
    unchanged = []
    for seed in seeds:
        seeded = dataclasses.replace(config, seed=seed)
        folder = work_dir / f"seed_{seed}"

        progress(f"seed {seed}: stage 1 ({config.objectives[0]}), shared by every variant")
        clock = _Clock()
        first = train_csmf(data, seeded.single_objective(config.objectives[0]), folder / "stage_1", verbose=verbose)
        first_cost = clock.spent()

        def timed(name: str, train: Callable, before: dict = first_cost):
            """Train one variant; its cost counts what it continues from (``before``: wall and CPU seconds)."""
            progress(f"seed {seed}: {LABELS[name]}")
            clock = _Clock()
            run = train()
            own = clock.spent()
            fit = run.logs[-1]["train"]   # the last stage's fit: where early stopping left it
            runs[name].append({"seed": seed, "test": {k: run.results[k] for k in ("stage", "fused") if k in run.results},
                               **{k: before[k] + own[k] for k in own}, "own": own,
                               "last_stage_fit": {k: fit[k] for k in ("start_val_recall@50", "val_recall@50",
                                                                      "best_epoch")}})
            return run

        timed("from_start", lambda: train_csmf(data, seeded, folder / "from_start", verbose=verbose, pretrained=first))
        base = timed("reserved_base", lambda: train_csmf(data, shorter_config(seeded, True), folder / "reserved",
                                                         verbose=verbose, pretrained=first))
        timed("extended", lambda: extend_csmf(data, folder / "reserved", config.objectives[-1], folder / "extended",
                                              verbose=verbose), runs["reserved_base"][-1])
        timed("no_reserve", lambda: train_csmf(data, shorter_config(seeded, False), folder / "no_reserve",
                                               verbose=verbose, pretrained=first))
        # The extension must leave every score of the objectives it already served as it was.
        before, after = runs["reserved_base"][-1]["test"]["stage"], runs["extended"][-1]["test"]["stage"]
        unchanged.append(max(abs(after[k] - before[k]) for k in before if k.split("/")[0] in base.model.objectives))
    new = config.objectives[-1]
    paired = [e["test"]["stage"][f"{new}/recall@50"] - s["test"]["stage"][f"{new}/recall@50"]
              for e, s in zip(runs["extended"], runs["from_start"])]
    return {"objectives": list(config.objectives), "new_objective": new, "seeds": list(seeds),
            "config": config.to_json(), "ks": [20, 50, 100],
            "methods": {name: {"label": LABELS[name], "runs": runs[name], "summary": summarise_runs(runs[name])}
                        for name in LABELS},
            "cost": {name: {"seconds": summarise([r["seconds"] for r in runs[name]]),
                            "cpu_seconds": summarise([r["cpu_seconds"] for r in runs[name]])} for name in LABELS},
            "extension_only": {k: summarise([r["own"][k] for r in runs["extended"]]) for k in ("seconds", "cpu_seconds")},
            "new_objective_recall50_extended_minus_from_start": {"per_seed": paired, **summarise(paired)},
            "existing_objectives_max_abs_change": unchanged}


def extension_markdown(study: dict, command: str, data_note: str, seconds: float) -> str:
    """The report: setup, per-objective tables (mean ± std over seeds), the paired comparison on the new
    objective, the exactness check and the cost."""
    new, objectives = study["new_objective"], study["objectives"]
    methods = study["methods"]
    config = study["config"]
    summary = {n: m["summary"]["stage"] for n, m in methods.items()}
    mean = lambda name, key: summary[name][key]["mean"]  # noqa: E731
    std = lambda name, key: summary[name][key]["std"]  # noqa: E731
    paired = study["new_objective_recall50_extended_minus_from_start"]
    cost = lambda name: (f"{study['cost'][name]['cpu_seconds']['mean']:.0f} ± "  # noqa: E731
                         f"{study['cost'][name]['cpu_seconds']['std']:.0f} s")
    key = f"{new}/recall@50"
    lines = [f"# Adding an objective later: {' -> '.join(objectives[:-1])}, then {new}", "",
             f"Command: `{command}` ({seconds / 60:.1f} min in all). {data_note}", "",
             f"Towers: id embedding {config['tower']['id_embedding_dim']}, feature embeddings "
             f"{config['tower']['feature_embedding_dim']}, hidden {list(config['tower']['hidden_units'])}, output "
             f"{config['tower']['output_dim']}; tau {config['tau']} (the extended model reserves with tau "
             f"{config['tau'][-1]} after {objectives[-2]}); at most {config['max_epochs']} epochs per fit, "
             f"{config['later_stage_max_epochs'] or config['max_epochs']} for later stages, patience "
             f"{config['patience']}, recovery {config['recovery_max_epochs']} epochs; popularity prior "
             f"{'on' if config['popularity_prior'] else 'off'}. Seeds {study['seeds']}; mean ± sample std; test "
             "split, every item ranked, the user's seen pairs left out (the project's evaluator).", "",
             "## Findings", "",
             f"- **{new}** (the objective added later), test Recall@50: extended {mean('extended', key):.4f} ± "
             f"{std('extended', key):.4f}, from the start {mean('from_start', key):.4f} ± {std('from_start', key):.4f}; "
             f"paired difference (extended - from start) per seed "
             f"{', '.join(f'{d:+.4f}' for d in paired['per_seed'])} (mean {paired['mean']:+.4f}). With the same "
             f"settings the two do the same computation: the reserve's CPP after {objectives[-2]} is the transition the "
             f"from-start cascade makes there (same tau, same guard rails: the reserved stage counts as a later one), "
             f"and the added stage starts from the same weights with the same seeds, so "
             + ("the zero difference measured is what the method predicts." if not any(paired["per_seed"]) else
                "they would agree exactly but for run-to-run nondeterminism of multi-threaded TensorFlow, which is "
                "all the measured difference can be."),
             *_kept_start(study),
             f"- **What the added stage brings** ({new} on test, against ranking it by the {objectives[-2]} stage's "
             f"score as the model did before the extension): Recall@50 {mean('extended', key):.4f} ± "
             f"{std('extended', key):.4f} vs {mean('reserved_base', key):.4f} ± {std('reserved_base', key):.4f}, "
             f"NDCG@50 {mean('extended', f'{new}/ndcg@50'):.4f} vs {mean('reserved_base', f'{new}/ndcg@50'):.4f}.",
             f"- **Objectives served before the extension** ({', '.join(objectives[:-1])}): the largest change of "
             f"any of their test metrics between the model before and after the extension, over seeds: "
             f"{max(study['existing_objectives_max_abs_change']):.2e} (their parameters are bit-identical, "
             "tested in tests/test_extend.py).",
             f"- **What reserving costs** the objectives served before the extension (the reserve moves the least "
             f"informative units of {objectives[-2]} out of its stage): "
             + "; ".join(f"{o} Recall@50 {mean('reserved_base', f'{o}/recall@50'):.4f} with the reserve, "
                         f"{mean('no_reserve', f'{o}/recall@50'):.4f} without"
                         for o in objectives[:-1]) + ".",
             f"- **Cost** (CPU seconds of the process, all threads; wall clock in results.json, on a shared "
             f"machine): adding {new} to the trained model took {study['extension_only']['cpu_seconds']['mean']:.0f}"
             f" ± {study['extension_only']['cpu_seconds']['std']:.0f} s; the whole cascade from the start "
             f"{cost('from_start')}, the extended model in all (stage 1, the shorter cascade with its reserve, the "
             f"extension) {cost('extended')}, the shorter cascade without a reserve {cost('no_reserve')}.", ""]
    lines += [f"## The fit of the {new} stage (validation Recall@50 of {new})", "",
              "Early stopping's candidates include the weights the fit starts from (best epoch 0), where "
              f"s_{len(objectives)} = s_{len(objectives) - 1} (the stage's item block starts at zero).", "",
              "| seed | model | at the start | after each epoch | best epoch |", "|---|---|---:|---|---:|"]
    for name in ("from_start", "extended"):
        for run in methods[name]["runs"]:
            fit = run["last_stage_fit"]
            lines.append(f"| {run['seed']} | {methods[name]['label']} | {fit['start_val_recall@50']:.4f} | "
                         + ", ".join(f"{v:.4f}" for v in fit["val_recall@50"]) + f" | {fit['best_epoch']} |")
    lines.append("")
    for objective in objectives:
        note = f" (the rows without {new} rank it by their last stage's score)" if objective == new else ""
        lines += [f"## {objective}: each objective's own score s_t{note}", "",
                  metric_table(study, objective, "stage"), ""]
    lines += [f"## {new}: fused score (weights {config['fusion_weights']})", "",
              metric_table({**study, "methods": {k: v for k, v in methods.items() if k in ("from_start", "extended")}},
                           new, "fused"), ""]
    return "\n".join(lines)


def _kept_start(study: dict) -> list[str]:
    """A finding when the added stage kept its start in every run of both models."""
    runs = [r for name in ("from_start", "extended") for r in study["methods"][name]["runs"]]
    if any(r["last_stage_fit"]["best_epoch"] != 0 for r in runs):
        return []
    new, previous = study["new_objective"], study["objectives"][-2]
    return [f"- In every seed, in both models, no epoch of the {new} stage beat its start on validation, so early "
            f"stopping kept the start: {new} is ranked by the {previous} stage's score plus {new}'s popularity prior, "
            "and the stage's own units stay unused (the fit table below). On this data the comparison therefore "
            f"shows that adding {new} later reproduces the from-start model exactly, not which of the two trains "
            f"{new} better."]


def write_extension_report(study: dict, out_dir: Path, command: str, data_note: str, seconds: float) -> Path:
    """``<out_dir>/report.md`` and ``<out_dir>/results.json``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rounded({**study, "command": command, "data": data_note,
                                                              "seconds": seconds}), indent=1))
    (out_dir / "report.md").write_text(extension_markdown(study, command, data_note, seconds))
    return out_dir / "report.md"
