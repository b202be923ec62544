"""Train / validation / test splits of an :class:`InteractionTable`.

Every row is one (user, item) pair with all of its cascade labels, so a split assigns whole rows: a pair and
its labels always land together in exactly one part, and the three parts partition the table.

- ``method="time"``: global cut-offs at the timestamp quantiles ``1 - val - test`` and ``1 - test``
  (train: ``ts < c1``; val: ``c1 <= ts < c2``; test: ``ts >= c2``). Ties at a cut-off go to the later
  part, so the realised fractions are close to, not exactly, the requested ones.
- ``method="user"``: per pair, ``h = hash(seed, user, item) / 2**64`` (uniform in ``[0, 1)``); the pair goes
  to test when ``h < test``, to val when ``test <= h < test + val``, else train. A user none of whose pairs
  landed in train gets the pair with the largest ``h`` among them moved to train, so every user of val/test
  is known at training time. The hash only depends on ``(seed, user, item)``: the assignment of a pair does
  not change when other rows are added or removed.
- ``method="user_time"``: per user, the user's own latest pairs: a user with ``n`` pairs, ordered by
  ``(timestamp, pair hash)``, gives its last ``round(test * n)`` pairs to test and the ``round(val * n)``
  before them to val, always keeping at least one pair in train (the val share shrinks first). Every user
  with enough history is evaluated, on what that user did next (the usual leave-last-out protocol of
  rating data). A global cut-off instead evaluates only the users active after it: on MovieLens
  ml-latest-small, 74 of 610 users. Other users' later pairs can be in train; the protocol trades that
  leak for an evaluation over every user.
- ``method="auto"`` (default): ``"time"`` when the table has timestamps, else ``"user"``.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from csmf_tf.data.table import InteractionTable

SPLIT_METHODS = ("auto", "time", "user", "user_time")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class Splits:
    """The three parts of a split; together they hold every row of the source table exactly once."""

    train: InteractionTable
    val: InteractionTable
    test: InteractionTable

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised on ``uint64`` (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _string_hash64(values: np.ndarray) -> np.ndarray:
    """Stable 64-bit hash per string (blake2b; Python's ``hash`` is salted per process)."""
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                  for s in uniq], dtype=np.uint64)
    return h[inverse.reshape(-1)]


def pair_hash_unit(user_id: np.ndarray, item_id: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic ``float64`` in ``[0, 1)`` per (user, item) pair for a given ``seed``."""
    seed_h = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    with np.errstate(over="ignore"):
        x = _splitmix64(_string_hash64(user_id) ^ seed_h)
        x = _splitmix64(x ^ _string_hash64(item_id))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def resolve_method(table: InteractionTable, method: str) -> str:
    """``method`` with ``"auto"`` replaced by what it means for ``table``."""
    if method == "auto":
        return "time" if table.timestamp is not None else "user"
    return method


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
            and val_fraction + test_fraction < 1.0):
        raise ValueError(f"need 0 <= val_fraction, test_fraction and val + test < 1; got "
                         f"val_fraction={val_fraction}, test_fraction={test_fraction}")


def _time_parts(table: InteractionTable, val_fraction: float, test_fraction: float) -> np.ndarray:
    ts = table.timestamp
    c1, c2 = np.quantile(ts, [1.0 - val_fraction - test_fraction, 1.0 - test_fraction], method="lower")
    part = np.zeros(len(ts), dtype=np.int8)
    if val_fraction > 0:
        part[ts >= c1] = 1
    if test_fraction > 0:
        part[ts >= c2] = 2
    return part


def _user_parts(table: InteractionTable, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    h = pair_hash_unit(table.user_id, table.item_id, seed)
    part = np.zeros(len(h), dtype=np.int8)
    part[h < test_fraction + val_fraction] = 1
    part[h < test_fraction] = 2
    # Users with nothing in train: move their largest-h pair (the one "closest" to train) to train.
    users, uidx = np.unique(table.user_id.astype(str), return_inverse=True)
    uidx = uidx.reshape(-1)
    in_train = np.bincount(uidx, weights=(part == 0), minlength=len(users)) > 0
    orphan_rows = np.flatnonzero(~in_train[uidx])
    if len(orphan_rows):
        order = np.lexsort((-h[orphan_rows], uidx[orphan_rows]))
        rows = orphan_rows[order]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = uidx[rows[1:]] != uidx[rows[:-1]]
        part[rows[first]] = 0
    return part


def _user_time_parts(table: InteractionTable, val_fraction: float, test_fraction: float,
                     seed: int) -> np.ndarray:
    users, uidx = np.unique(table.user_id.astype(str), return_inverse=True)
    uidx = uidx.reshape(-1)
    # Ties in time (ratings entered in the same second) are broken by the pair hash: deterministic.
    order = np.lexsort((pair_hash_unit(table.user_id, table.item_id, seed), table.timestamp, uidx))
    counts = np.bincount(uidx, minlength=len(users))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - starts[uidx[order]]
    n_test = np.minimum(np.rint(test_fraction * counts).astype(np.int64), counts - 1)
    n_val = np.minimum(np.rint(val_fraction * counts).astype(np.int64), counts - 1 - n_test)
    from_end = counts[uidx] - rank             # 1 for the user's latest pair
    part = np.zeros(len(order), dtype=np.int8)
    part[from_end <= (n_test + n_val)[uidx]] = 1
    part[from_end <= n_test[uidx]] = 2
    return part


def split_table(table: InteractionTable, val_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 0, method: str = "auto") -> Splits:
    """Split ``table`` into train / val / test (see the module docstring for the rules).

    Args:
      table: rows to split; (user, item) pairs are expected to be unique.
      val_fraction, test_fraction: target fractions of rows.
      seed: selects the pair hash for ``method="user"`` and ``"user_time"``'s tie-break (ignored by
        ``"time"``, which is deterministic).
      method: one of :data:`SPLIT_METHODS`.

    Returns:
      :class:`Splits` whose parts keep the source row order.
    """
    _check_fractions(val_fraction, test_fraction)
    if len(table) == 0:
        raise ValueError("cannot split an empty table")
    if method not in SPLIT_METHODS:
        raise ValueError(f"method must be one of {SPLIT_METHODS}; got {method!r}")
    method = resolve_method(table, method)
    if method in ("time", "user_time") and table.timestamp is None:
        raise ValueError(f"method={method!r} needs table.timestamp; this table has none (use method='user')")
    if method == "time":
        part = _time_parts(table, val_fraction, test_fraction)
    elif method == "user_time":
        part = _user_time_parts(table, val_fraction, test_fraction, seed)
    else:
        part = _user_parts(table, val_fraction, test_fraction, seed)
    return Splits(table.take(part == 0), table.take(part == 1), table.take(part == 2))
