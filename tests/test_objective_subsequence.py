"""A run on a subsequence of the data's objectives (e.g. exposure -> conversion, click skipped): every
objective is ranked by the right stage, and the popularity prior carries the trained objectives' columns."""
import dataclasses

import numpy as np
import pytest

from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training.evaluation import cascade_vectors, scoring_stage, served_columns, stage_vectors
from csmf_tf.training.run import train_csmf, training_log_popularity
from csmf_tf.training.stages import TrainingConfig

DATA = ("exposure", "click", "conversion")


@pytest.mark.parametrize("trained, expected", [
    (("exposure", "click", "conversion"), (1, 2, 3)),
    (("exposure", "click"), (1, 2, 2)),          # a prefix: objectives beyond it by s_S
    (("exposure", "conversion"), (1, 1, 2)),     # click by the stage before it
    (("exposure",), (1, 1, 1)),
    (("click",), (1, 1, 1)),                     # nothing trained before exposure: stage 1
])
def test_scoring_stage(trained, expected):
    assert tuple(scoring_stage(o, DATA, trained) for o in DATA) == expected


def test_served_columns_refuses_an_objective_the_data_lacks():
    assert served_columns(DATA, ("exposure", "conversion")) == [0, 2]
    with pytest.raises(ValueError, match="purchase"):
        served_columns(DATA, ("exposure", "purchase"))


def test_run_on_a_subsequence_scores_and_serves_its_own_objectives(tmp_path):
    data = prepare(generate_cascade(300, 120, 9000, seed=5))
    config = TrainingConfig(objectives=("exposure", "conversion"), tau=(0.3,), fusion_weights=(1.0, 2.0),
                            tower=TowerConfig(8, 4, (16,), 8), max_epochs=1, recovery_max_epochs=1,
                            batch_size=256, later_stage_batch_size=64, min_output_units=2)
    run = train_csmf(data, dataclasses.replace(config), tmp_path / "run", verbose=0)
    log_pop = training_log_popularity(data, DATA)
    np.testing.assert_array_equal(run.prior.log_popularity, log_pop[:, [0, 2]])
    assert list(run.prior.alphas) == [run.results["prior_alphas"][0], run.results["prior_alphas"][2]]
    vectors = cascade_vectors(run.model, data.testing, DATA)
    stage_1, _ = stage_vectors(run.model, data.testing, 1)
    stage_2, _ = stage_vectors(run.model, data.testing, 2)
    np.testing.assert_array_equal(vectors.queries[1], stage_1)   # click: s_1
    np.testing.assert_array_equal(vectors.queries[2], stage_2)   # conversion: its own stage
