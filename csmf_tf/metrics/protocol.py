"""The evaluation protocol: which users are ranked, over which corpus, with which pairs left out.

For a split (validation or test) and each objective ``t``, :func:`build_evaluation` indexes the split's
positives of ``t`` (users with at least one are evaluated) over the full item catalog, and removes
from each user's ranking the pairs the system already knows:

- ``"seen"`` (default): every pair of the user in the training split (and, for test, the validation
  split), whatever its labels. Under a pair split such a pair can never be a test positive of any
  objective, so ranking it only wastes slots; an exposure-trained model ranks the user's training
  exposures high, which the old rule penalised for click and conversion.
- ``"objective"``: only the user's training (and validation) positives *of objective t* (the rule of
  the first reports: an item merely exposed in training is still ranked for click).

Every method (popularity included) is scored under the same rule, and reports state which one.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from csmf_tf.data.table import Catalog, InteractionTable
from csmf_tf.metrics.retrieval import EvalSet, build_eval_set

SEEN, OBJECTIVE = "seen", "objective"
EXCLUSION_RULES = (SEEN, OBJECTIVE)


@dataclasses.dataclass
class EvaluationData:
    """Everything needed to rank the full corpus for one split's users, per objective."""

    users: Catalog
    items: Catalog
    eval_sets: dict[str, EvalSet]
    exclusion: str = SEEN


def build_evaluation(train: InteractionTable, target: InteractionTable, users: Catalog, items: Catalog,
                     exclude: Sequence[InteractionTable] = (), exclusion: str = SEEN) -> EvaluationData:
    """Eval sets of ``target``'s positives per objective; the pairs of ``train`` (and ``exclude``)
    selected by ``exclusion`` (see the module docstring) are removed from each user's ranking."""
    if exclusion not in EXCLUSION_RULES:
        raise ValueError(f"exclusion must be one of {EXCLUSION_RULES}, got {exclusion!r}")
    eval_sets = {}
    for objective in train.objectives:
        if not target.positives(objective).any():
            continue
        eval_sets[objective] = build_eval_set(train, target, objective, items.ids, users.ids,
                                              exclude=list(exclude) or None, on_unknown="drop",
                                              exclude_all_train_pairs=exclusion == SEEN)
    return EvaluationData(users, items, eval_sets, exclusion)
