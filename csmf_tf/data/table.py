"""The in-memory cascade table every adapter produces and every consumer reads.

An :class:`InteractionTable` holds one row per (user, item) pair, columnar:

- ``user_id``, ``item_id``: ``np.ndarray`` of ``str`` (dtype ``object``), shape ``[n]``;
- ``labels``: ``np.ndarray`` of ``int8``, shape ``[n, S]``, one 0/1 column per objective in cascade
  order (``objectives``); the cascade holds: ``labels[:, t] <= labels[:, t-1]``;
- ``timestamp``: optional ``np.ndarray`` of ``int64`` (seconds), shape ``[n]``;
- ``user_features`` / ``item_features``: ``{name: np.ndarray [n]}``; categorical columns are ``str``
  (dtype ``object``), numeric columns are ``float32``. ``feature_kinds`` maps every feature name to
  ``"categorical"`` or ``"numeric"``.

Side features belong to their entity: a user's features are the same on every row of that user (the
same holds for items); :meth:`user_catalog` / :meth:`item_catalog` take the first occurrence.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

DEFAULT_OBJECTIVES: tuple[str, ...] = ("exposure", "click", "conversion")
CATEGORICAL = "categorical"
NUMERIC = "numeric"


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Unique entities (users or items) with their side features.

    ``ids``: ``[m]`` str (object); ``features``: ``{name: [m]}``. Row ``r`` describes ``ids[r]``.
    """

    ids: np.ndarray
    features: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def as_inputs(self, id_key: str) -> dict[str, np.ndarray]:
        """Tower inputs: ``{id_key: ids, **features}``."""
        return {id_key: self.ids, **dict(self.features)}

    def take(self, rows: np.ndarray) -> "Catalog":
        return Catalog(self.ids[rows], {k: v[rows] for k, v in self.features.items()})


def objective_position(objectives: Sequence[str], objective: str | int) -> int:
    """Index of ``objective`` (a name, or already an index) in ``objectives``; KeyError names the known ones."""
    if isinstance(objective, (int, np.integer)):
        return int(objective)
    try:
        return list(objectives).index(objective)
    except ValueError:
        raise KeyError(f"unknown objective {objective!r}; known: {list(objectives)}") from None


@dataclasses.dataclass
class InteractionTable:
    user_id: np.ndarray
    item_id: np.ndarray
    labels: np.ndarray
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    timestamp: np.ndarray | None = None
    user_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    item_features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    feature_kinds: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.user_id)
        self.labels = np.asarray(self.labels, dtype=np.int8)
        if self.labels.ndim != 2 or self.labels.shape != (n, len(self.objectives)):
            raise ValueError(f"labels must have shape [{n}, {len(self.objectives)}] "
                             f"(rows, objectives {self.objectives}); got {self.labels.shape}")
        for name, col in [("item_id", self.item_id), ("timestamp", self.timestamp),
                          *self.user_features.items(), *self.item_features.items()]:
            if col is not None and len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} rows, expected {n}")
        for name in [*self.user_features, *self.item_features]:
            if self.feature_kinds.get(name) not in (CATEGORICAL, NUMERIC):
                raise ValueError(f"feature {name!r} needs a kind in feature_kinds "
                                 f"({CATEGORICAL!r} or {NUMERIC!r})")

    def __len__(self) -> int:
        return len(self.user_id)

    @property
    def num_objectives(self) -> int:
        return len(self.objectives)

    def objective_index(self, objective: str | int) -> int:
        return objective_position(self.objectives, objective)

    def positives(self, objective: str | int) -> np.ndarray:
        """Boolean row mask of the positives of ``objective``."""
        return self.labels[:, self.objective_index(objective)] == 1

    def take(self, rows: np.ndarray) -> "InteractionTable":
        """A new table with the selected rows (boolean mask or indices)."""
        return InteractionTable(
            user_id=self.user_id[rows], item_id=self.item_id[rows], labels=self.labels[rows],
            objectives=self.objectives,
            timestamp=None if self.timestamp is None else self.timestamp[rows],
            user_features={k: v[rows] for k, v in self.user_features.items()},
            item_features={k: v[rows] for k, v in self.item_features.items()},
            feature_kinds=dict(self.feature_kinds))

    @staticmethod
    def concat(tables: Sequence["InteractionTable"]) -> "InteractionTable":
        first = tables[0]
        return InteractionTable(
            user_id=np.concatenate([t.user_id for t in tables]),
            item_id=np.concatenate([t.item_id for t in tables]),
            labels=np.concatenate([t.labels for t in tables]),
            objectives=first.objectives,
            timestamp=None if first.timestamp is None else np.concatenate([t.timestamp for t in tables]),
            user_features={k: np.concatenate([t.user_features[k] for t in tables]) for k in first.user_features},
            item_features={k: np.concatenate([t.item_features[k] for t in tables]) for k in first.item_features},
            feature_kinds=dict(first.feature_kinds))

    def _catalog(self, ids: np.ndarray, features: Mapping[str, np.ndarray]) -> Catalog:
        unique, first = np.unique(ids, return_index=True)
        return Catalog(unique, {k: v[first] for k, v in features.items()})

    def user_catalog(self) -> Catalog:
        return self._catalog(self.user_id, self.user_features)

    def item_catalog(self) -> Catalog:
        return self._catalog(self.item_id, self.item_features)
