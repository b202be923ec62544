"""Two real MultiWorkerMirroredStrategy workers on 127.0.0.1 train stages 1 and 2 of the cascade."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training import checkpoints
from csmf_tf.training.stages import TrainingConfig, build_model
from csmf_tf.data.prepared import prepare
from csmf_tf.testing.processes import free_ports

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--num-users", "300", "--num-items", "200", "--num-exposures", "12000", "--data-seed", "3"]
TRAIN = ["--output-dim", "16", "--hidden-units", "32", "--max-epochs", "3", "--recovery-max-epochs", "1",
         "--batch-size", "128", "--min-output-units", "2", "--objectives", "exposure,click"]


def _wait_all(processes, timeout):
    """Wait for every worker; if one fails or time runs out, kill the rest (they would block forever
    in a collective waiting for the dead peer)."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in processes):
        if any(p.poll() not in (None, 0) for p in processes):
            break
        time.sleep(0.5)
    for p in processes:
        if p.poll() is None:
            p.kill()
    for index, p in enumerate(processes):
        p.wait()
        assert p.returncode == 0, f"worker {index} rc={p.returncode}:\n{open(p.log_path).read()[-3000:]}"


def _command(out):
    return [sys.executable, "-m", "pipelines.train_cascade", *SIZE, *TRAIN, "--out", str(out)]


def test_two_workers_keep_stage_one_frozen_and_match_one_worker(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        log = open(tmp_path / f"worker_{index}.log", "w")  # a file, not a pipe: a full pipe would block
        processes.append(subprocess.Popen(_command(tmp_path / "multi") + ["--multi-worker"], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        processes[-1].log_path = log.name
    _wait_all(processes, timeout=420)
    single = subprocess.run(_command(tmp_path / "single"), cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]

    chief, other = tmp_path / "multi", tmp_path / "multi" / ".worker_1"
    data = prepare(generate_cascade(300, 200, 12000, seed=3))
    config = TrainingConfig.from_json(json.loads((chief / "stage_2" / "config.json").read_text()))
    assert config.tower == TowerConfig(64, 16, (32,), 16)

    def load(path, stage):
        model = build_model(config, data.users, data.items, data.table.feature_kinds)
        checkpoints.load_stage(model, path, stage)
        return [w.layer for tower in model.towers for w in tower.wrappers]

    # Mirrored training: both workers end with identical parameters.
    for a, b in zip(load(chief, 2), load(other, 2)):
        np.testing.assert_array_equal(a.owned_weight.numpy(), b.owned_weight.numpy())
    # Stage 1's parameters are bit-identical after the distributed stage 2.
    for before, after in zip(load(chief, 1), load(chief, 2)):
        kept = after.weight_owner.numpy() <= 1
        assert kept.any()
        np.testing.assert_array_equal(before.owned_weight.numpy()[kept], after.owned_weight.numpy()[kept])
    # Metrics are comparable to one worker (same data, same global batch; different reduction order).
    multi = json.loads((chief / "results.json").read_text())["stage"]
    one = json.loads((tmp_path / "single" / "results.json").read_text())["stage"]
    for key in ("exposure/recall@50", "click/recall@50"):
        assert abs(multi[key] - one[key]) < 0.1, (key, multi[key], one[key])
