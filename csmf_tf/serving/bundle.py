"""A directory holding everything :func:`export_retrieval_model` needs, so training and export can run
in different processes (``pipelines/export.py --bundle DIR``).

Layout::

    DIR/user_tower.keras, DIR/item_tower.keras   tf.keras models (tfmot wrappers allowed)
    DIR/item_catalog.npz                          ids + one array per item feature
    DIR/meta.json                                 owner_stage, objectives, default_weights, config,
                                                  popularity prior alphas (if any)
    DIR/popularity_prior.npy                      the prior's log-popularity columns [I, S] (if any)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.data.table import Catalog
from csmf_tf.metrics.prior import PopularityPrior


@dataclasses.dataclass
class TowerBundle:
    """Loaded contents of a bundle directory."""

    user_model: tf.keras.Model
    item_model: tf.keras.Model
    item_catalog: Catalog
    owner_stage: np.ndarray
    objectives: tuple[str, ...]
    default_weights: list[float] | None
    config: dict
    popularity_prior: PopularityPrior | None = None


def save_tower_bundle(directory: str | os.PathLike, user_model: tf.keras.Model, item_model: tf.keras.Model,
                      item_catalog: Catalog, owner_stage: np.ndarray, objectives: Sequence[str],
                      default_weights: Sequence[float] | None = None,
                      config: Mapping[str, Any] | None = None,
                      popularity_prior: PopularityPrior | None = None) -> Path:
    """Write a bundle (see module docstring); returns its directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    user_model.save(out / "user_tower.keras")
    item_model.save(out / "item_tower.keras")
    cols = {"__ids__": np.asarray(item_catalog.ids).astype(str)}
    for name, values in item_catalog.features.items():
        values = np.asarray(values)
        cols[name] = values.astype(str) if values.dtype == object else values
    np.savez(out / "item_catalog.npz", **cols)
    meta = {"owner_stage": np.asarray(owner_stage).astype(int).tolist(), "objectives": list(objectives),
            "default_weights": None if default_weights is None else [float(w) for w in default_weights],
            "config": dict(config or {}),
            "prior_alphas": None if popularity_prior is None else popularity_prior.alphas.tolist()}
    if popularity_prior is not None:
        np.save(out / "popularity_prior.npy", popularity_prior.log_popularity)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def bundle_item_ids(directory: str | os.PathLike) -> np.ndarray:
    """The item ids of a bundle's catalog, in index row order (without loading the towers)."""
    with np.load(Path(directory) / "item_catalog.npz", allow_pickle=False) as data:
        return data["__ids__"]


def set_bundle_default_weights(directory: str | os.PathLike, weights: Sequence[float],
                               source: Mapping[str, Any] | None = None) -> None:
    """Replace the ``default_weights`` an export of the bundle serves (one per objective); ``source``
    says where they came from (kept in ``meta.json`` as ``default_weights_source``)."""
    path = Path(directory) / "meta.json"
    meta = json.loads(path.read_text())
    weights = [float(w) for w in weights]
    if len(weights) != len(meta["objectives"]) or not all(np.isfinite(weights)):
        raise ValueError(f"need {len(meta['objectives'])} finite weights for objectives {meta['objectives']}, "
                         f"got {weights}")
    meta["default_weights"], meta["default_weights_source"] = weights, dict(source or {})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path)


def load_tower_bundle(directory: str | os.PathLike) -> TowerBundle:
    """Read a bundle written by :func:`save_tower_bundle`."""
    import tensorflow_model_optimization as tfmot  # the towers may hold prune_low_magnitude wrappers

    src = Path(directory)
    for name in ("user_tower.keras", "item_tower.keras", "item_catalog.npz", "meta.json"):
        if not (src / name).exists():
            raise FileNotFoundError(f"bundle {src} lacks {name}")
    with tfmot.sparsity.keras.prune_scope():
        user_model = tf.keras.models.load_model(src / "user_tower.keras")
        item_model = tf.keras.models.load_model(src / "item_tower.keras")
    with np.load(src / "item_catalog.npz", allow_pickle=False) as data:
        cols = {k: data[k] for k in data.files}
    ids = cols.pop("__ids__").astype(object)
    features = {k: (v.astype(object) if v.dtype.kind == "U" else v) for k, v in cols.items()}
    meta = json.loads((src / "meta.json").read_text())
    prior = None
    if meta.get("prior_alphas") is not None:
        prior = PopularityPrior(np.load(src / "popularity_prior.npy"), np.asarray(meta["prior_alphas"], np.float32))
    return TowerBundle(user_model, item_model, Catalog(ids, features),
                       np.asarray(meta["owner_stage"], np.int32), tuple(meta["objectives"]),
                       meta.get("default_weights"), meta.get("config", {}), prior)
