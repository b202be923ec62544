"""Can a learned single-objective two-tower beat popularity? A one-knob-at-a-time tuning study.

On id-only data with few interactions per user (Beibei) the learned towers can end up no better
than most-popular. Before any claim, this study varies, for each objective's ordinary two-tower
(the CSMF towers with one stage), one knob at a time around a base setting, then combines the best
value of every knob:

- output dimension ``D`` (and the id embedding dimension with it);
- L2 regularisation of the embedding tables: ``lambda * sum ||E||^2`` added to the loss;
- softmax temperature ``T``;
- log-Q correction strength ``alpha``: the in-batch logits are corrected by ``-alpha * log p(i)``
  (``alpha = 1``: TFRS's full correction, the project default; ``alpha = 0``: none, which leaves
  the in-batch softmax biased towards popular items);
- learning rate.

Each setting is selected on the validation Recall@50 of its objective; popularity is scored the same
way; the test split is evaluated once, for the best setting of each objective and for popularity.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import tensorflow as tf

from csmf_tf.data.tfdata import item_sampling_probabilities, make_objective_dataset
from csmf_tf.metrics.vectors import evaluate_vectors, popularity_scoring
from csmf_tf.training.evaluation import cascade_vectors
from csmf_tf.training.fit import ValidationRecall, fit_until_best
from csmf_tf.training.stages import TrainingConfig, build_model


@dataclasses.dataclass(frozen=True)
class Setting:
    """One two-tower configuration of the study (``dim`` sets both the id embedding and ``D``)."""

    dim: int = 64
    l2: float = 0.0
    temperature: float = 0.05
    log_q: float = 1.0
    learning_rate: float = 1e-3

    @property
    def key(self) -> str:
        return (f"D={self.dim},l2={self.l2:g},T={self.temperature:g},alpha={self.log_q:g},"
                f"lr={self.learning_rate:g}")


KNOBS: dict[str, tuple] = {"dim": (16, 32, 128), "l2": (0.1, 1.0), "temperature": (0.2, 0.5),
                           "log_q": (0.0, 0.5), "learning_rate": (3e-3,)}


def train_tower(data, objective: str, setting: Setting, base: TrainingConfig, seed: int = 0):
    """An ordinary two-tower of ``objective`` under ``setting``; returns ``(model, fit log)``."""
    tower = dataclasses.replace(base.tower, id_embedding_dim=setting.dim, output_dim=setting.dim)
    config = dataclasses.replace(base.single_objective(objective), tower=tower, temperature=setting.temperature,
                                 learning_rate=setting.learning_rate, seed=seed)
    model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
    if setting.l2:
        for tower_model, masked in ((model.user_model, model.user_tower), (model.item_model, model.item_tower)):
            for wrapper in masked.embeddings:
                table = wrapper.layer.embeddings
                tower_model.add_loss(lambda table=table: setting.l2 * tf.reduce_sum(tf.square(table)))
    # p(i)^alpha as the sampling probability: the correction becomes -alpha * log p(i).
    probabilities = {i: p ** setting.log_q for i, p in item_sampling_probabilities(data.train, objective).items()}
    dataset = make_objective_dataset(data.train, objective, config.batch_size, shuffle=True, seed=seed + 1,
                                     item_catalog=data.items, sampling_probabilities=probabilities)
    score = ValidationRecall(data.validation, (objective,),
                             lambda m: cascade_vectors(m, data.validation, (objective,)), verbose=False)
    log = fit_until_best(model, dataset, score, config.learning_rate, config.max_epochs, config.patience,
                         config.start_is_candidate, optimizer=config.optimizer)
    return model, log


def run_study(data, base: TrainingConfig, start: Setting, objectives: Sequence[str],
              knobs: dict[str, tuple] = KNOBS, progress: Callable[[str], None] = print) -> dict:
    """One-knob-at-a-time around ``start``, then the best value of every knob together, per objective."""
    out = {"start": dataclasses.asdict(start), "knobs": {k: list(v) for k, v in knobs.items()}, "objectives": {}}
    popularity = popularity_scoring(data.train, data.validation, objectives)
    for objective in objectives:
        pop_val = evaluate_vectors(popularity, data.validation, ks=(50,))["stage"][f"{objective}/recall@50"]
        tried: dict[str, dict] = {}

        def attempt(setting: Setting) -> float:
            if setting.key not in tried:
                start_time = time.time()
                model, log = train_tower(data, objective, setting, base)
                tried[setting.key] = {"setting": dataclasses.asdict(setting), "val_recall@50": log["best_val_recall@50"],
                                      "epochs": log["epochs"], "seconds": time.time() - start_time,
                                      "model": model}
                progress(f"study {objective} {setting.key}: val Recall@50 {log['best_val_recall@50']:.4f} "
                         f"(popularity {pop_val:.4f}), {log['epochs']} epochs")
            return tried[setting.key]["val_recall@50"]

        base_score = attempt(start)
        best_values = {}
        for knob, values in knobs.items():
            scores = {getattr(start, knob): base_score}
            for value in values:
                scores[value] = attempt(dataclasses.replace(start, **{knob: value}))
            best_values[knob] = max(scores, key=scores.get)
        attempt(dataclasses.replace(start, **best_values))
        best_key = max(tried, key=lambda k: tried[k]["val_recall@50"])
        best = tried[best_key]
        test = evaluate_vectors(cascade_vectors(best["model"], data.testing, (objective,)), data.testing)["stage"]
        pop_test = evaluate_vectors(popularity, data.testing)["stage"]
        out["objectives"][objective] = {
            "popularity_val_recall@50": pop_val,
            "tried": [{k: v for k, v in t.items() if k != "model"} for t in tried.values()],
            "best": best_key, "best_per_knob": best_values,
            "test": {k: v for k, v in test.items() if k.startswith(objective)},
            "popularity_test": {k: v for k, v in pop_test.items() if k.startswith(objective)},
        }
        for t in tried.values():
            t.pop("model", None)
    return out


def study_markdown(study: dict, command: str, seconds: float) -> str:
    lines = ["# Can a learned two-tower beat popularity here? (tuning study)", "",
             f"Produced by `{command}` in {seconds / 60:.1f} minutes. One knob at a time around "
             f"`{Setting(**study['start']).key}`, then the best value of every knob together; each "
             "setting is an ordinary single-objective two-tower (the CSMF towers, one stage), selected on "
             "validation Recall@50; test is evaluated once for the best setting. `alpha` is the log-Q "
             "correction strength (1 = TFRS's full correction, the project default; 0 = none); `l2` "
             "multiplies the squared norm of the embedding tables.", ""]
    for objective, result in study["objectives"].items():
        lines += [f"## {objective}", "", "| setting | val Recall@50 | epochs |", "|---|---:|---:|",
                  f"| popularity | {result['popularity_val_recall@50']:.4f} | - |"]
        for t in sorted(result["tried"], key=lambda t: -t["val_recall@50"]):
            lines.append(f"| {Setting(**t['setting']).key} | {t['val_recall@50']:.4f} | {t['epochs']} |")
        lines += ["", f"Best: `{result['best']}`. Test Recall@50 / NDCG@50: "
                  f"{result['test'][f'{objective}/recall@50']:.4f} / {result['test'][f'{objective}/ndcg@50']:.4f}"
                  f"; popularity {result['popularity_test'][f'{objective}/recall@50']:.4f} / "
                  f"{result['popularity_test'][f'{objective}/ndcg@50']:.4f}.", ""]
    return "\n".join(lines)
