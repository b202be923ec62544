"""The results report: ``results.json``, ``report.md`` and PNG plots from one experiment result dict.

Tables show ``mean ± std`` over seeds (sample std). Plots:

- ``recall50.png``: test Recall@50 per objective and method, error bars = std over seeds;
- ``sensitivity_tau.png``: CSMF test Recall@50 of every objective against ``tau`` of each transition;
- ``sensitivity_eta.png``: the same against the AML margin scale ``eta``;
- ``fusion_weights.png``: Recall@50 of every objective under the fused ranking as one weight varies
  (CSMF solid; multi-vector baselines dashed/dotted).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS = ("recall", "ndcg")
_STYLES = {"csmf": "-", "separate": "--", "shared_bottom": ":"}


#: How the report names each split rule (csmf_tf/data/splits.py; older results do not record it).
_SPLIT_LABELS = {"time": "global time cut-offs", "user": "per-pair hash",
                 "user_time": "each user's own latest pairs"}


def _cell(summary: dict | None, precision: int = 4) -> str:
    if not summary:
        return "-"
    mean, std = summary["mean"], summary["std"]
    if math.isnan(mean):
        return "nan"
    return f"{mean:.{precision}f} ± {std:.{precision}f}" if summary["n"] > 1 else f"{mean:.{precision}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(result: dict, objective: str, part: str = "stage", ks: Sequence[int] | None = None) -> str:
    """Rows: methods; columns: Recall@K and NDCG@K of ``objective`` (``part``: stage or fused)."""
    ks = ks or result["ks"]
    columns = [f"{m}@{k}" for m in METRICS for k in ks]
    rows = []
    for method in result["methods"].values():
        values = method["summary"].get(part, {})
        rows.append([method["label"], *(_cell(values.get(f"{objective}/{c}")) for c in columns)])
    return _table(["method", *[c.replace("recall", "Recall").replace("ndcg", "NDCG") for c in columns]], rows)


def cost_table(result: dict) -> str:
    rows = []
    for method in result["methods"].values():
        serving = method["serving"]
        queries = serving["ann_queries"] if method["parameters"] else 0
        chosen = method["chosen"]
        if isinstance(chosen, dict):
            chosen = "; ".join(f"{k}: {v}" for k, v in chosen.items())
        seconds = method["summary"]["seconds"]
        rows.append([method["label"], f"{method['parameters']:,}", str(serving["vector_dim"]),
                     str(queries), f"{seconds['mean']:.0f} ± {seconds['std']:.0f}", chosen or "-"])
    return _table(["method", "parameters", "fused vector dim", "ANN queries / request",
                   "training time (s)", "chosen setting"], rows)


def tuning_table(result: dict) -> str:
    grid = [f"lr={h['learning_rate']:g},T={h['temperature']:g}" for h in result["budget"]["grid"]]
    rows = []
    for method in result["methods"].values():
        if method["tuning"] and method["chosen"]:   # popularity has nothing to tune
            rows.append([method["label"], ", ".join(method["select_on"]),
                         *(f"{method['tuning'].get(k, float('nan')):.4f}" for k in grid)])
    return _table(["method", "selected on", *grid], rows)


def forgetting_table(result: dict) -> str | None:
    method = result["methods"].get("sequential")
    if not method:
        return None
    objectives = result["objectives"]
    per_step: dict[str, dict[str, list[float]]] = {}
    for run in method["runs"]:
        for step in run.get("logs", {}).get("steps", []):
            for objective, value in step["val"].items():
                per_step.setdefault(step["after"], {}).setdefault(objective, []).append(value)
    if not per_step:
        return None
    rows = []
    for after, values in per_step.items():
        rows.append([f"after fine-tuning on {after}",
                     *(_cell({"mean": float(np.mean(values[o])), "std": float(np.std(values[o], ddof=1))
                              if len(values[o]) > 1 else 0.0, "n": len(values[o])}) for o in objectives)])
    return _table(["naive sequential model", *[f"{o} val Recall@50" for o in objectives]], rows)


def sensitivity_tables(result: dict) -> list[str]:
    """The tau and eta sweeps: validation Recall@50 (what a default may be chosen on) and test Recall@50."""
    sens = result.get("sensitivity") or {}
    objectives = result["objectives"]
    later = objectives[1:]
    out = []

    def rows(points):
        return [[f"{p['value']:g}",
                 *(f"{p['val'][f'{o}/recall@50']:.4f}" if "val" in p else "-" for o in later),
                 *(f"{p['test']['stage'][f'{o}/recall@50']:.4f}" for o in objectives)] for p in points]

    header = [*(f"val {o}" for o in later), *(f"test {o}" for o in objectives)]
    for transition, points in (sens.get("tau") or {}).items():
        out.append(f"tau of transition {transition} ({objectives[int(transition) - 1]} -> "
                   f"{objectives[int(transition)]}), Recall@50:\n\n" + _table(["tau", *header], rows(points)))
    if sens.get("eta"):
        out.append("AML margin eta (nats), Recall@50:\n\n" + _table(["eta", *header], rows(sens["eta"])))
    return out


#: The comparison the quality target is stated in: single-vector methods CSMF must match or beat, and
#: multi-vector methods it must reach 0.98x of (click and conversion), as in the quality issue.
SINGLE_VECTOR = ("popularity", "popularity_exposure", "unified", "sequential")
MULTI_VECTOR = ("separate", "finetuned_copies", "shared_bottom", "mmoe")


def verdict(result: dict, k: int = 50, ratio: float = 0.98) -> list[str]:
    """Whether CSMF meets the target on this report (test Recall@k means over seeds), one line each.

    Click and later objectives: CSMF >= every single-vector method (popularity lists, each
    single-objective two-tower, unified, naive sequential) and >= ``ratio`` x the best multi-vector
    method. First objective: CSMF >= ``ratio`` x the exposure-only two-tower. Also: CSMF's seed std
    against the median seed std of the learned baselines.
    """
    methods, objectives = result["methods"], result["objectives"]
    if "csmf" not in methods:
        return []

    def mean(name: str, objective: str) -> float:
        return methods[name]["summary"]["stage"][f"{objective}/recall@{k}"]["mean"]

    singles = [n for n in methods if n in SINGLE_VECTOR or n.startswith("two_tower[")]
    multis = [n for n in MULTI_VECTOR if n in methods]
    lines = []
    first = objectives[0]
    reference = f"two_tower[{first}]"
    if reference in methods:
        ok = mean("csmf", first) >= ratio * mean(reference, first)
        lines.append(f"- {first}: CSMF {mean('csmf', first):.4f} vs {ratio:g} x exposure-only "
                     f"{ratio * mean(reference, first):.4f}: {'met' if ok else 'NOT met'}.")
    for objective in objectives[1:]:
        csmf = mean("csmf", objective)
        above = [n for n in singles if mean(n, objective) > csmf]
        best = max(multis, key=lambda n: mean(n, objective)) if multis else None
        parts = [f"- {objective}: CSMF {csmf:.4f}; single-vector methods above it: "
                 + (", ".join(f"{methods[n]['label']} {mean(n, objective):.4f}" for n in above) or "none")]
        if best:
            parts.append(f"best multi-vector {methods[best]['label']} {mean(best, objective):.4f} "
                         f"(x{ratio:g} = {ratio * mean(best, objective):.4f})")
        ok = not above and (best is None or csmf >= ratio * mean(best, objective))
        lines.append("; ".join(parts) + f": {'met' if ok else 'NOT met'}.")
    stds = [methods[n]["summary"]["stage"][f"{o}/recall@{k}"]["std"] for o in objectives
            for n in methods if n in MULTI_VECTOR or n in SINGLE_VECTOR[2:] or n.startswith("two_tower[")]
    csmf_std = max(methods["csmf"]["summary"]["stage"][f"{o}/recall@{k}"]["std"] for o in objectives)
    if stds:
        lines.append(f"- seed spread: CSMF's largest std {csmf_std:.4f} vs the learned baselines' median "
                     f"{float(np.median(stds)):.4f} ({csmf_std / max(float(np.median(stds)), 1e-12):.1f}x).")
    return lines


def summary_table(result: dict, k: int = 50) -> str:
    """One row per method: cost and test Recall@k / NDCG@k per objective, mean ± std (the README table)."""
    objectives = result["objectives"]
    rows = []
    for name, method in result["methods"].items():
        stage = method["summary"]["stage"]
        serving = method["serving"]
        cost = "fixed lists" if not method["parameters"] else f"{serving['vector_dim']} / {serving['ann_queries']}"
        cells = [f"{_cell(stage.get(f'{o}/recall@{k}'), 3)} / {_cell(stage.get(f'{o}/ndcg@{k}'), 3)}"
                 for o in objectives]
        rows.append([method["label"], f"{method['parameters']:,}", cost, *cells])
    return _table(["method", "parameters", "index dim / ANN queries",
                   *(f"{o} R@{k} / N@{k}" for o in objectives)], rows)


# ----- plots --------------------------------------------------------------------------------------

def plot_recall(result: dict, path: Path, k: int = 50) -> Path:
    objectives = result["objectives"]
    methods = list(result["methods"].values())
    fig, axes = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 0.32 * len(methods) + 1.6),
                             squeeze=False, sharey=True)
    for ax, objective in zip(axes[0], objectives):
        means, stds = [], []
        for method in methods:
            summary = method["summary"]["stage"].get(f"{objective}/recall@{k}", {"mean": np.nan, "std": 0.0})
            means.append(summary["mean"])
            stds.append(summary["std"])
        colours = ["#c44e52" if m["family"] == "csmf" else "#dd8452" if m["family"] == "ablation" else "#4c72b0"
                   for m in methods]
        ax.barh(range(len(methods)), means, xerr=stds, color=colours, alpha=0.85)
        ax.set_yticks(range(len(methods)), [m["label"] for m in methods], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{objective}: test Recall@{k}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _sweep_axes(ax, points: list[dict], objectives: Sequence[str], xlabel: str, base: float | None) -> None:
    x = [p["value"] for p in points]
    for objective in objectives:
        ax.plot(x, [p["test"]["stage"][f"{objective}/recall@50"] for p in points], marker="o", label=objective)
    if base is not None:
        ax.axvline(base, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test Recall@50")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_tau(result: dict, path: Path) -> Path | None:
    sens = result.get("sensitivity") or {}
    if not sens.get("tau"):
        return None
    objectives = result["objectives"]
    transitions = list(sens["tau"])
    fig, axes = plt.subplots(1, len(transitions), figsize=(4.5 * len(transitions), 3.4), squeeze=False)
    for ax, transition in zip(axes[0], transitions):
        t = int(transition)
        _sweep_axes(ax, sens["tau"][transition], objectives, f"tau_{t} (CPP after {objectives[t - 1]})",
                    sens["base_tau"][t - 1])
        ax.set_title(f"{objectives[t - 1]} -> {objectives[t]}", fontsize=9)
    fig.suptitle("CSMF sensitivity to the CPP threshold tau", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_eta(result: dict, path: Path) -> Path | None:
    sens = result.get("sensitivity") or {}
    if not sens.get("eta"):
        return None
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    _sweep_axes(ax, sens["eta"], result["objectives"], "eta (AML margin scale)", sens["base_eta"])
    ax.set_title("CSMF sensitivity to the AML margin scale", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_fusion(result: dict, path: Path) -> Path | None:
    fusion = (result.get("sensitivity") or {}).get("fusion")
    if not fusion:
        return None
    objectives = result["objectives"]
    fig, axes = plt.subplots(1, len(objectives), figsize=(4.5 * len(objectives), 4.6), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, varied in zip(axes[0], objectives):
        rows = fusion[varied]
        x = [r["value"] for r in rows]
        methods = [m for m in _STYLES if m in rows[0]]
        for j, objective in enumerate(objectives):
            for method in methods:
                ax.plot(x, [r[method][f"{objective}/recall@50"] for r in rows], ls=_STYLES[method],
                        color=colours[j % len(colours)], marker="o" if method == "csmf" else None, ms=3,
                        label=f"{objective} ({result['methods'][method]['label']})")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlabel(f"weight of {varied} (others {', '.join(f'{w:g}' for w in result['fusion_weights'])})")
        ax.set_title(f"varying k_{varied}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test Recall@50 of the fused ranking")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(objectives), fontsize=7)
    fig.suptitle("Fusion-weight trade-off (no retraining): colour = objective evaluated, style = method",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * len(_STYLES), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----- markdown -----------------------------------------------------------------------------------

def findings(result: dict, k: int = 50) -> list[str]:
    """Plain statements the numbers support: CSMF vs each baseline and vs popularity, per objective."""
    methods = result["methods"]
    objectives = result["objectives"]
    lines = []
    if "csmf" not in methods:
        return lines

    def mean(name: str, objective: str) -> float:
        return methods[name]["summary"]["stage"].get(f"{objective}/recall@{k}", {"mean": float("nan")})["mean"]

    for objective in objectives:
        csmf = mean("csmf", objective)
        better = [n for n in methods if n != "csmf" and mean(n, objective) > csmf]
        best_name = max(methods, key=lambda n: -np.inf if math.isnan(mean(n, objective)) else mean(n, objective))
        lines.append(f"- **{objective}** Recall@{k}: CSMF {csmf:.4f}; best {methods[best_name]['label']} "
                     f"{mean(best_name, objective):.4f}; " + (
                         "no method is above CSMF." if not better else
                         f"above CSMF: {', '.join(methods[n]['label'] for n in better)}."))
        pops = [n for n in ("popularity", "popularity_exposure") if n in methods]
        if pops:
            pop = max(mean(n, objective) for n in pops)
            # the combined methods, not the single-objective towers used on other objectives
            learned = [n for n in methods if methods[n]["parameters"] > 0 and not n.startswith("two_tower[")]
            losing = [n for n in learned if mean(n, objective) <= pop]
            if losing:
                lines.append(f"  - popularity ({pop:.4f}) is at or above: "
                             f"{', '.join(methods[n]['label'] for n in losing)}.")
    return lines


def _head_weighting_note(result: dict) -> str:
    """Which methods also tuned a head loss weighting (csmf_tf/models/multitask.py), if any did."""
    tuned = [m["label"] for m in result["methods"].values() if any("heads=" in k for k in m["tuning"])]
    if not tuned:
        return ""
    values = sorted({k.split("heads=")[1] for m in result["methods"].values() for k in m["tuning"] if "heads=" in k},
                    key=float, reverse=True)
    return (f" ({', '.join(tuned)} also try the later objectives' loss weight {' / '.join(values)} at every "
            "point, the first objective's being 1: a larger budget than the other methods get)")


def _load_note(result: dict) -> str:
    """The 1-minute load average at start and end: wall time is only comparable on an idle machine."""
    load = result.get("load_average")
    if not load:
        return ""
    return f", load average {load['start']:.1f} at the start and {load['end']:.1f} at the end"


def _hard_negative_label(base: dict) -> str:
    """Names the hard negatives' log-Q correction when it is not the default (none)."""
    correction = base.get("hard_negative_correction", "none")
    return "" if correction == "none" else f" (log-Q correction: {correction})"


def _optimizer_label(base: dict) -> str:
    """How the report names the training optimizer of ``base`` (a TrainingConfig as JSON)."""
    label = "lazy Adam (only the rows a batch touches)" if base.get("optimizer") == "lazy_adam" else "Adam"
    return label + (", sparse embeddings" if base.get("sparse_embeddings") else "")


def markdown(result: dict, images: dict[str, Path | None]) -> str:
    objectives = result["objectives"]
    data = result["data"]
    budget = result["budget"]
    base = result["base_config"]
    lines = [f"# CSMF experiments: {result['dataset']} ({result['mode']} mode)", "",
             f"Produced by `{result['command']}` in {result['seconds'] / 60:.1f} minutes of wall time"
             + (f" and {result['cpu_seconds'] / 60:.1f} minutes of CPU time" if "cpu_seconds" in result else "")
             + f" ({result['started']}, {result['machine']}{_load_note(result)}).", "",
             "## Data", "",
             f"{data['rows']:,} rows, {data['users']:,} users, {data['items']:,} items; positives per objective: "
             + ", ".join(f"{o} {n:,}" for o, n in data["positives"].items())
             + ". Split" + (f" ({_SPLIT_LABELS.get(data['split_method'], data['split_method'])})"
                            if "split_method" in data else "")
             + f" train/val/test = {data['split'][0]:,}/{data['split'][1]:,}/{data['split'][2]:,} rows; "
             "test users with a positive: " + ", ".join(f"{o} {n:,}" for o, n in data["test_users"].items()) + ".",
             "",
             "## Protocol", "",
             f"- Towers: id embedding {base['tower']['id_embedding_dim']}, feature embedding "
             f"{base['tower']['feature_embedding_dim']}, MLP {tuple(base['tower']['hidden_units'])}, output D = "
             f"{base['tower']['output_dim']}; batch {base['batch_size']} (later stages and later-objective fine-tunes "
             f"{base.get('later_stage_batch_size') or base['batch_size']}); {_optimizer_label(base)}; "
             f"at most {base['max_epochs']} epochs per "
             f"fit, early stopping (patience {base['patience']}) on validation Recall@50 with best-weight restore"
             + (", the weights a fit starts from being a candidate too." if base.get("start_is_candidate") else "."),
             f"- CSMF defaults: tau = {tuple(base['tau'])}, eta = {base['eta']}, unit-level CPP, accuracy recovery "
             f"(at most {base['recovery_max_epochs']} epochs), cascade hard negatives"
             f"{_hard_negative_label(base)}, fusion weights "
             f"{tuple(base['fusion_weights'])}. MMoE: {result['num_experts']} experts.",
             "- Tuning budget (the same for every trained method): grid "
             + ", ".join(f"(lr {h['learning_rate']:g}, T {h['temperature']:g})" for h in budget["grid"])
             + f" on seed {budget['seeds'][0]}" + _head_weighting_note(result)
             + "; the point with the best validation Recall@50 (mean over the "
             "objectives the method serves; a single-objective tower: its own objective) is chosen; the test "
             "split is evaluated once with it. Seeds " + ", ".join(str(s) for s in budget["seeds"])
             + " retrain the chosen point; tables show mean ± sample std over seeds.",
             "- Metrics: full-corpus Recall@K / NDCG@K averaged over users with a positive; "
             + ("every training (and, for test, validation) pair of the user is excluded from each objective's "
                "ranking (rule 'seen')" if result.get("exclusion", "objective") == "seen" else
                "the user's training (and, for test, validation) positives of the objective are excluded (rule "
                "'objective')") + ", for every method alike.",
             "- Popularity prior: "
             + ("every learned method is scored with `score_t + alpha_t log(1 + c_t(i))`, alpha_t chosen per "
                "objective on validation from multiples " + ", ".join(f"{a:g}" for a in budget.get("prior_grid", []))
                + " of the score/popularity scale ratio (csmf_tf/metrics/prior.py); rows marked 'w/o popularity "
                "prior' are the same runs without it." if budget.get("prior_grid") else "off."), ""]
    lines += ["## Findings (generated from the numbers)", "", *findings(result), ""]
    lines += ["## Against the quality target (test Recall@50 means over seeds)", "", *verdict(result), ""]
    lines += ["## Per-objective results (test, ranking objective t by the method's score for t)", ""]
    for objective in objectives:
        lines += [f"### {objective}", "", metric_table(result, objective), ""]
    weights = ", ".join(f"{w:g}" for w in result["fusion_weights"])
    lines += [f"## Fused ranking (k = {weights}), test", "",
              "Single-vector methods rank every objective the same way; multi-vector methods score "
              "`sum_t k_t <u_t, v_t>` (concatenated weighted vectors).", ""]
    for objective in objectives:
        lines += [f"### {objective} (fused)", "", metric_table(result, objective, "fused"), ""]
    lines += ["## Cost", "", "Parameters: trainable weights of all models a method needs. Fused vector dim / "
              "ANN queries: the index a request needs to rank by the fused score (popularity: a fixed list). "
              "Training time: wall clock on this machine, including the shared stage-1 pretraining for the "
              "methods built on it.", "", cost_table(result), ""]
    lines += ["## Tuning (validation mean Recall@50 per grid point, first seed)", "", tuning_table(result), ""]
    table = forgetting_table(result)
    if table:
        lines += ["## Forgetting of naive sequential fine-tuning (validation Recall@50)", "", table, ""]
    sens = sensitivity_tables(result)
    if sens or any(images.get(k) for k in ("tau", "eta", "fusion")):
        lines += ["## Sensitivity (CSMF, first seed, chosen setting; defaults are read on the validation columns)", ""]
        for name in ("tau", "eta", "fusion"):
            if images.get(name):
                lines += [f"![{name}]({Path(images[name]).name})", ""]
        for text in sens:
            lines += [text, ""]
    if images.get("recall"):
        lines += ["## Overview", "", f"![recall]({Path(images['recall']).name})", ""]
    return "\n".join(lines)


def rounded(value, digits: int = 6):
    """``value`` with every float rounded to ``digits`` decimals (keeps the committed JSON small)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write_report(result: dict, out_dir: Path | str) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the PNGs into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {"recall": plot_recall(result, out / "recall50.png"),
              "tau": plot_tau(result, out / "sensitivity_tau.png"),
              "eta": plot_eta(result, out / "sensitivity_eta.png"),
              "fusion": plot_fusion(result, out / "fusion_weights.png")}
    (out / "results.json").write_text(json.dumps(rounded(result), indent=1, default=float))
    (out / "report.md").write_text(markdown(result, images))
    return {"json": out / "results.json", "markdown": out / "report.md",
            **{k: v for k, v in images.items() if v is not None}}
