"""Exact retrieval metrics: full-corpus Recall@K / NDCG@K per objective, and the popularity baseline."""
from csmf_tf.metrics.popularity import popularity_counts
from csmf_tf.metrics.retrieval import (DEFAULT_KS, EvalSet, build_eval_set, evaluate_retrieval,
                                       format_results_table, prefix_results)

__all__ = ["DEFAULT_KS", "EvalSet", "build_eval_set", "evaluate_retrieval", "format_results_table",
           "prefix_results", "popularity_counts"]
