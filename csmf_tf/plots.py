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
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 0.9 + 0.55 * len(layers) * len(stages)),
                             squeeze=False)
    cmap = ListedColormap(_COLOURS[:len(objectives)])
    for ax, layer in zip(axes[:, 0], layers):
        grid = np.array([m["towers"][tower][layer] for m in maps])
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0.5, vmax=len(objectives) + 0.5,
                  interpolation="nearest")
        ax.set_yticks(range(len(stages)), [f"after {objectives[s - 1]}" for s in stages], fontsize=7)
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
