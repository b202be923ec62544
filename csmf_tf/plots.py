"""Pictures of a CSMF run: unit ownership per layer after each stage, what CPP freed, the results table
(Recall@K per objective and method), and the ownership map as a TensorBoard image."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from csmf_tf.training.checkpoints import completed_stages, stage_dir  # noqa: E402

_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def plot_ownership(run_dir: Path | str, tower: str, path: Path | str) -> Path:
    """One row of panels per layer of ``tower``; in each, one strip per stage checkpoint, one cell
    per unit, coloured by the unit's owner stage after that stage."""
    fig = _ownership_figure(run_dir, tower)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _ownership_figure(run_dir: Path | str, tower: str):
    run_dir = Path(run_dir)
    stages = completed_stages(run_dir)
    maps = [json.loads((stage_dir(run_dir, s) / "ownership.json").read_text()) for s in stages]
    objectives = maps[-1]["objectives"]
    layers = list(maps[-1]["towers"][tower])
    # Units CPP reserved after the last stage (TrainingConfig.reserve_tau) are owned by stage S + 1.
    reserved = any(max(units) > len(objectives) for m in maps for units in m["towers"][tower].values())
    objectives = [*objectives, "a later objective (reserved)"] if reserved else objectives
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 0.9 + 0.55 * len(layers) * len(stages)),
                             squeeze=False)
    cmap = ListedColormap(_COLOURS[:len(objectives)])
    for ax, layer in zip(axes[:, 0], layers):
        grid = np.array([m["towers"][tower][layer] for m in maps])
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.5, vmax=len(objectives) + 0.5,
                  interpolation="nearest")
        ax.set_yticks(range(len(stages)), [f"after {maps[-1]['objectives'][s - 1]}" for s in stages], fontsize=7)
        counts = ", ".join(f"{o}: {int((grid[-1] == i + 1).sum())}" for i, o in enumerate(objectives))
        ax.set_title(f"{layer} ({grid.shape[1]} units; {counts})", fontsize=8, loc="left")
        ax.set_xticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLOURS[i]) for i in range(len(objectives))]
    fig.legend(handles, [f"owned by {o}" for o in objectives], loc="lower center", ncol=len(objectives))
    fig.suptitle(f"CSMF unit ownership, {tower} tower")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig


def write_ownership_summary(run_dir: Path | str, log_dir: Path | str, step: int) -> None:
    """The ownership maps of both towers (checkpoints of ``run_dir`` so far) as TensorBoard images
    ``ownership/user`` and ``ownership/item`` at ``step`` (the stage) in ``log_dir``."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for tower in ("user", "item"):
            fig = _ownership_figure(run_dir, tower)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            plt.close(fig)
            image = tf.image.decode_png(buffer.getvalue(), channels=4)
            tf.summary.image(f"ownership/{tower}", image[tf.newaxis], step=step,
                             description=f"unit owner stage per layer of the {tower} tower after each stage")
    writer.close()


def plot_results(rows: Mapping[str, Mapping[str, float]], objectives: Sequence[str], path: Path | str,
                 metric: str = "recall@50", title: str | None = None) -> Path:
    """Grouped bars: ``metric`` per objective (groups) for each row of a results table (bars).

    ``rows``: ``{method label: {"<objective>/<metric>": value, ...}}`` (what
    :func:`csmf_tf.metrics.retrieval.format_results_table` prints); a missing value is no bar.
    """
    labels = list(rows)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 + 0.45 * len(labels) * len(objectives)), 4.2 + 0.2 * len(labels)))
    x = np.arange(len(objectives))
    top = 0.0
    for n, label in enumerate(labels):
        values = [rows[label].get(f"{o}/{metric}", np.nan) for o in objectives]
        top = max([top] + [v for v in values if np.isfinite(v)])
        bars = ax.bar(x + (n - (len(labels) - 1) / 2) * width, values, width, label=label,
                      color=_COLOURS[n % len(_COLOURS)])
        ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
    ax.set_xticks(x, objectives)
    ax.set_ylabel(metric.replace("recall", "Recall").replace("ndcg", "NDCG"))
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    ax.set_title(title or f"Test {metric.replace('recall', 'Recall').replace('ndcg', 'NDCG')} per objective")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(3, len(labels)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_cpp_information(logs: Sequence[dict], path: Path | str) -> Path:
    """Share of each layer's information mass (and of its units) that CPP freed, per stage."""
    transitions = [log for log in logs if "cpp" in log]
    if not transitions:
        raise ValueError("no CPP step in these logs")
    layers = [r["layer"] for r in transitions[0]["cpp"]]
    width = 0.8 / (2 * len(transitions))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(layers)), 4))
    x = np.arange(len(layers))
    for n, log in enumerate(transitions):
        reports = {r["layer"]: r for r in log["cpp"]}
        mass = [reports[l]["information_freed"] / max(reports[l]["information_total"], 1e-12) for l in layers]
        units = [reports[l]["pruned"] / max(reports[l]["candidates"], 1) for l in layers]
        ax.bar(x + (2 * n) * width, mass, width, label=f"after stage {log['stage']}: information mass",
               color=_COLOURS[n % len(_COLOURS)])
        ax.bar(x + (2 * n + 1) * width, units, width, label=f"after stage {log['stage']}: units",
               color=_COLOURS[n % len(_COLOURS)], alpha=0.45)
    ax.set_xticks(x + width * (len(transitions) - 0.5), layers, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("share freed for the next stage")
    ax.set_title("CPP: what each stage handed to the next")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_fusion_tradeoff(search: Mapping, path: Path | str) -> Path:
    """The fusion-weight search of :mod:`csmf_tf.metrics.fusion_search` (its ``to_json()``), two panels.

    Left: every searched point, the target against the metric it trades against (the first constraint's,
    else the target's first term that is not the only one, else the first metric of another objective),
    feasible points filled, the upper frontier as a line, the chosen point starred and the constraint's
    threshold dashed. Right: each fused metric the target reads, for the feasible points sorted by the
    target (what every objective gets as the target grows).
    """
    points = search["points"]
    keys = list(points[0]["metrics"])
    thresholds = search.get("constraint_thresholds") or {}
    guarded = next(iter(thresholds), None)
    x_key = guarded.split(" >= ")[0] if guarded else (keys[1] if len(keys) > 1 else keys[0])
    x = np.array([p["metrics"][x_key] for p in points])
    y = np.array([p["value"] for p in points])
    feasible = np.array([p["feasible"] for p in points])
    chosen = next(i for i, p in enumerate(points) if p["weights"] == search["chosen_weights"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    left.scatter(x[~feasible], y[~feasible], s=16, facecolors="none", edgecolors="#999999", label="infeasible")
    left.scatter(x[feasible], y[feasible], s=16, color=_COLOURS[0], label="feasible")
    order = np.argsort(-x, kind="stable")
    frontier = np.maximum.accumulate(y[order])   # best target reachable at or above each x
    left.plot(x[order], frontier, color=_COLOURS[0], lw=1, alpha=0.6, label="upper frontier")
    weights = ", ".join(f"{k:.2f}" for k in search["chosen_weights"])
    left.scatter([x[chosen]], [y[chosen]], marker="*", s=220, color=_COLOURS[3], zorder=5,
                 label=f"chosen k = ({weights})")
    if guarded:
        left.axvline(thresholds[guarded], ls="--", color=_COLOURS[3], lw=1, label=guarded)
    left.set_xlabel(f"fused {x_key}")
    left.set_ylabel("target")
    left.set_title(search["target"], fontsize=8)
    left.legend(fontsize=7)
    ranked = [i for i in np.argsort(y, kind="stable") if feasible[i]]
    for n, key in enumerate(keys):
        right.plot(range(len(ranked)), [points[i]["metrics"][key] for i in ranked], color=_COLOURS[n % len(_COLOURS)],
                   lw=1.2, label=f"fused {key}")
        right.axhline(search["stage_metrics"][key], color=_COLOURS[n % len(_COLOURS)], ls=":", lw=1,
                      label=f"{key} by its own stage")
    right.axvline(ranked.index(chosen), color=_COLOURS[3], ls="--", lw=1, label="chosen")
    right.set_xlabel("feasible points, by increasing target")
    right.set_ylabel("validation metric")
    right.legend(fontsize=7)
    fig.suptitle(f"Fusion weights on validation: {len(points)} points of the simplex "
                 f"({', '.join(search['objectives'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
