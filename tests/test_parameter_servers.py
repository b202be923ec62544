"""Parameter-server training: the masked layers on partitioned variables, then a real cluster.

The first tests build ``ShardedVariable``s in this process and check the pieces the masked layers need
on them (row writes, the per-shard masking op, gradient masks, column-owned stage changes). The
``test_parameter_server_*`` tests start a real ``ParameterServerStrategy`` cluster on 127.0.0.1: two
parameter servers and two workers are ``python -m pipelines.train_cascade --parameter-servers``
processes with their own ``TF_CONFIG`` (the command a real deployment runs on every task), and the
coordinator is the same command as the chief. One cluster serves them all, one coordinator after
another as on long-lived workers (two small lookup coordinators, then a training run per test); one-process
runs of the same command at three seeds are the reference.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow.python.distribute.sharded_variable import ShardedVariable

from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.layers import masked, sharding
from csmf_tf.metrics.vectors import evaluate_vectors
from csmf_tf.training import checkpoints, parameter_servers
from csmf_tf.training.evaluation import cascade_vectors
from csmf_tf.training.stages import TrainingConfig, build_model
from csmf_tf.testing.processes import free_ports

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--num-users", "300", "--num-items", "200", "--num-exposures", "12000", "--data-seed", "3"]
TRAIN = ["--output-dim", "16", "--hidden-units", "32", "--max-epochs", "2", "--no-recovery", "--batch-size", "128",
         "--min-output-units", "2", "--objectives", "exposure,click", "--no-tensorboard"]
# Small enough that the id tables ([301, 64] and [201, 64] float32) and the first Dense kernels are
# sharded, the small category tables not.
PARAMETER_SERVERS = ["--parameter-servers", "--ps-min-shard-bytes", "4096"]
COMMAND = [sys.executable, "-m", "pipelines.train_cascade", *SIZE, *TRAIN]
ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
STARTUP_S, RUN_S = 240, 600


# ---- the masked layers on partitioned variables, in this process (no cluster) ----------------------

def _sharded(value: np.ndarray, rows: tuple[int, ...]) -> ShardedVariable:
    """``value`` as a ShardedVariable cut after the given row counts (what a partitioner makes)."""
    bounds = np.cumsum((0,) + rows)
    return ShardedVariable([tf.Variable(value[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("mask_rows", [(6, 4), (5, 5), None], ids=["aligned", "cut-elsewhere", "per-column"])
def test_shardwise_masking_op_equals_weight_times_mask(mask_rows):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(10, 4)).astype(np.float32)
    mask = (rng.random((10, 4) if mask_rows else (4,)) < 0.5).astype(np.float32)
    table = _sharded(weight, (6, 4))
    mask_variable = _sharded(mask, mask_rows) if mask_rows else tf.Variable(mask)
    pruning = sharding.ShardwisePruning(training_step_fn=lambda: 0,
                                        pruning_vars=[(table, mask_variable, tf.Variable(0.0))],
                                        pruning_schedule=masked.NeverPrune(), block_size=(1, 1),
                                        block_pooling_type="AVG")

    @tf.function
    def mask_weights():  # as in a training step
        pruning.weight_mask_op()

    mask_weights()
    np.testing.assert_array_equal(table.numpy(), weight * mask)


def test_shardwise_pruning_refuses_a_schedule_that_prunes():
    wrapper = masked.wrap(masked.MaskedDense(3))
    wrapper.build((None, 2))
    wrapper.pruning_obj._pruning_schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    with pytest.raises(ValueError, match="ConstantSparsity, not NeverPrune"):
        sharding.ShardwisePruning.replacing(wrapper.pruning_obj)


def test_gradient_mask_reaches_each_shard_of_a_partitioned_kernel():
    rng = np.random.default_rng(1)
    kernel_value = rng.normal(size=(5, 3)).astype(np.float32)
    mask_value = (rng.random((5, 3)) < 0.5).astype(np.float32)
    kernel, mask = _sharded(kernel_value, (3, 2)), _sharded(mask_value, (3, 2))
    x = tf.constant(rng.normal(size=(4, 5)).astype(np.float32))

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(x, masked.gradient_masked(kernel, mask)) ** 2)
        return tape.gradient(loss, kernel.variables)

    full = tf.transpose(x) @ (2 * (x @ kernel_value))  # d loss / d kernel, unmasked
    got = np.concatenate([g.numpy() for g in gradients()])
    np.testing.assert_allclose(got, full.numpy() * mask_value, rtol=1e-5)
    assert np.all(got[mask_value == 0] == 0)


def test_column_owned_table_stage_changes_are_the_same_on_a_sharded_table(monkeypatch):
    """Re-initialising freed columns and zeroing inactive ones, block by block (blocks that span both
    shards), gives a sharded table exactly the values of the same table unsharded."""
    monkeypatch.setattr(masked, "ROW_BLOCK", 100)
    layers = []
    for _ in range(2):
        layer = masked.MaskedEmbedding(301, 8, embeddings_initializer=tf.keras.initializers.RandomUniform(seed=3),
                                       column_owners=True)
        layer.build((None,))
        layers.append(layer)
    plain, partitioned = layers
    object.__setattr__(partitioned, "embeddings", _sharded(plain.embeddings.numpy(), (151, 150)))
    columns = np.arange(8) % 3 == 0
    for layer in layers:
        layer.reinitialise_columns(columns, seed=11)
        layer.keep_active(~(np.arange(8) % 4 == 1))
    np.testing.assert_array_equal(partitioned.embeddings.numpy(), plain.embeddings.numpy())
    np.testing.assert_array_equal(partitioned.active_column_l1(1), plain.active_column_l1(1))


def test_cluster_from_tf_config_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"], "chief": ["127.0.0.1:2"]},
                                                "task": {"type": "chief", "index": 0}}))
    with pytest.raises(ValueError, match=r"lacks \['ps'\]"):
        parameter_servers.cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"],
                                                            "chief": ["127.0.0.1:3"]},
                                                "task": {"type": "chief", "index": 0}}))
    resolver = parameter_servers.cluster_resolver()
    with pytest.raises(ValueError, match="min_shard_bytes and max_shards must be >= 1"):
        parameter_servers.parameter_server_strategy(resolver, min_shard_bytes=0)


def test_aligned_partitioner_starts_every_sharded_variable_on_ps_zero():
    partitioner = parameter_servers.AlignedMinSizePartitioner(min_shard_bytes=4096, max_shards=2)
    partitioner.strategy = SimpleNamespace(extended=SimpleNamespace(_variable_count=7))
    assert partitioner(tf.TensorShape([9, 16]), tf.float32) == [1, 1]  # small: whole, round robin goes on
    assert partitioner.strategy.extended._variable_count == 7
    assert partitioner(tf.TensorShape([301, 64]), tf.float32) == [2, 1]
    assert partitioner.strategy.extended._variable_count == 0


# ---- a real cluster ---------------------------------------------------------------------------------

def _start(command, log_path: Path, task: dict | None, cluster: dict | None) -> subprocess.Popen:
    env = dict(ENV)
    if task is not None:
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": task})
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the process
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def _log(process) -> str:
    return Path(process.log_path).read_text(errors="replace")


class Cluster:
    """Two ps and two worker tasks on free ports; :meth:`train` runs a coordinator (the chief)."""

    def __init__(self, workdir: Path):
        ports = free_ports(5)
        self.workdir = workdir
        self.spec = {"ps": [f"127.0.0.1:{p}" for p in ports[:2]],
                     "worker": [f"127.0.0.1:{p}" for p in ports[2:4]], "chief": [f"127.0.0.1:{ports[4]}"]}
        self.tasks = {}
        for kind in ("ps", "worker"):
            for index in range(2):
                self.start_task(kind, index)

    def start_task(self, kind: str, index: int) -> None:
        log = self.workdir / f"{kind}_{index}_{time.monotonic_ns()}.log"
        self.tasks[kind, index] = _start(COMMAND + PARAMETER_SERVERS, log, {"type": kind, "index": index}, self.spec)

    def wait_serving(self) -> None:
        deadline = time.time() + STARTUP_S
        for (kind, index), process in self.tasks.items():
            while "serving at" not in _log(process):
                assert process.poll() is None, f"{kind} {index} rc={process.returncode}:\n{_log(process)[-3000:]}"
                assert time.time() < deadline, f"{kind} {index} not serving after {STARTUP_S} s"
                time.sleep(0.5)

    def ensure_running(self) -> None:
        """Restart a task a previous test killed (same address, as a cluster manager would)."""
        for (kind, index), process in list(self.tasks.items()):
            if process.poll() is not None:
                self.start_task(kind, index)
        self.wait_serving()

    def train(self, out: Path) -> subprocess.Popen:
        return _start(COMMAND + PARAMETER_SERVERS + ["--out", str(out)], out.with_suffix(".log"),
                      {"type": "chief", "index": 0}, self.spec)

    def stop(self) -> None:
        for process in self.tasks.values():
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("parameter_servers")


#: One process is the reference at these seeds: this small setting's seed noise is larger than the 0.1
#: tolerance (README, "Parameter servers and the click check"), so one seed alone is not "one process".
REFERENCE_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def reference(workdir):
    """The same command in one process at :data:`REFERENCE_SEEDS`: the runs start at once, one after
    another in a background thread (one core's worth), and are waited for when a test needs them."""
    outs = [workdir / f"single_{seed}" for seed in REFERENCE_SEEDS]
    running: list[subprocess.Popen] = []

    def run_all() -> None:
        for seed, out in zip(REFERENCE_SEEDS, outs):
            running.append(_start(COMMAND + ["--seed", str(seed), "--out", str(out)], out.with_suffix(".log"),
                                  None, None))
            running[-1].wait(RUN_S)

    thread = threading.Thread(target=run_all, daemon=True)
    thread.start()

    def results() -> list[dict]:
        thread.join(RUN_S * len(outs))
        assert len(running) == len(outs), "the one-process reference runs did not all start"
        return [_finished(process, out) for process, out in zip(running, outs)]
    yield results
    for process in running:
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="module")
def cluster(workdir, reference):
    cluster = Cluster(workdir)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def data():
    return prepare(generate_cascade(300, 200, 12000, seed=3))


def _finished(process: subprocess.Popen, out: Path) -> dict:
    try:
        process.wait(RUN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{out.name} did not finish in {RUN_S} s:\n{_log(process)[-3000:]}")
    assert process.returncode == 0, f"{out.name} rc={process.returncode}:\n{_log(process)[-3000:]}"
    return json.loads((out / "results.json").read_text())


def _check_run(out: Path, results: dict, reference: list[dict], data) -> None:
    """Stage 1 bit-identical after stage 2, the checkpoints hold the sharded model exactly, and the
    metrics are within 0.1 Recall@50 of one process.

    "One process" is its runs at :data:`REFERENCE_SEEDS`, and the cluster run must be within 0.1 of at
    least one of them (inside their range widened by 0.1 each side). An asynchronous cluster run is
    one more draw of the training noise, and in this small setting that noise is larger than the
    tolerance: one process alone gave click 0.616 / 0.520 / 0.518 / 0.478 / 0.598 with seeds 0-4 at 4
    epochs (2026-12-02), so a comparison with seed 0 alone failed runs that were inside that spread."""
    config = TrainingConfig.from_json(json.loads((out / "stage_2" / "config.json").read_text()))

    def load(stage):
        model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
        checkpoints.load_stage(model, out, stage)
        return model

    def layers(model):
        return [wrapper.layer for tower in model.towers for wrapper in tower.wrappers]

    stage_1, stage_2 = load(1), load(2)
    for before, after in zip(layers(stage_1), layers(stage_2)):
        owner, weight = after.weight_owner.numpy(), after.owned_weight.numpy()
        assert (owner == 1).any() and (owner == 2).any(), after.name  # CPP handed stage 2 part of every layer
        np.testing.assert_array_equal(before.owned_weight.numpy()[owner == 1], weight[owner == 1],
                                      err_msg=f"{after.name}: stage-1 weights moved in stage 2")
    # The coordinator scored the sharded model; one process scores the checkpoint it wrote: the same numbers.
    rescored = evaluate_vectors(cascade_vectors(stage_2, data.testing, data.table.objectives), data.testing,
                                ks=(20, 50, 100, 200))["stage"]
    for key, value in results["without_prior"]["stage"].items():
        assert rescored[key] == pytest.approx(value, abs=1e-6), key
    # With the popularity prior (what the run reports) and without it (the towers alone).
    for scores, pick in (("with prior", lambda run: run["stage"]),
                         ("without prior", lambda run: run["without_prior"]["stage"])):
        for key in ("exposure/recall@50", "click/recall@50"):
            one_process = [pick(run)[key] for run in reference]
            gap = min(abs(pick(results)[key] - value) for value in one_process)
            assert gap < 0.1, (scores, key, pick(results)[key], "one process at seeds", REFERENCE_SEEDS, one_process)


#: A coordinator that builds a tower's id lookup (``csmf_tf.layers.lookup``) in the strategy's scope, as
#: the towers do, and looks its ids up on the workers (which hold their own copies of the table).
LOOKUP_COORDINATOR = """
import json, sys
import tensorflow as tf
from csmf_tf.layers.lookup import string_lookup
from csmf_tf.training import parameter_servers
strategy = parameter_servers.parameter_server_strategy(parameter_servers.cluster_resolver())
coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
ids = sys.argv[1].split(",")
with strategy.scope():
    lookup = string_lookup(ids, "item_id_lookup")
rows = tf.function(lambda: lookup(tf.constant(ids)))
print("ROWS", json.dumps([r.fetch().tolist() for r in [coordinator.schedule(rows) for _ in range(8)]]))
"""


def test_parameter_server_coordinators_one_after_another_keep_their_own_lookup_tables(cluster, workdir):
    """Workers outlive a coordinator (a resumed run, the next job, the tests below). TensorFlow named an
    eager table after a counter of the coordinator process, so the next coordinator, counting the same
    way, met the previous one's tables on the workers: "Table was already initialized with different
    data" (it also hit tables rebuilt after a worker loss). The strategy's tables are anonymous now."""
    cluster.wait_serving()
    for n, ids in enumerate((["a", "b", "c"], ["w", "x", "y", "z"])):
        log = workdir / f"lookup_{n}.log"
        process = _start([sys.executable, "-c", LOOKUP_COORDINATOR, ",".join(ids)], log,
                         {"type": "chief", "index": 0}, cluster.spec)
        try:
            process.wait(STARTUP_S)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 0, _log(process)[-3000:]
        rows = json.loads(re.search(r"^ROWS (.*)$", _log(process), re.M).group(1))
        assert rows == [list(range(1, len(ids) + 1))] * 8, rows  # row 0 is the OOV bucket


def test_parameter_server_cluster_shards_tables_and_keeps_stage_one_frozen(cluster, reference, data, workdir):
    cluster.wait_serving()
    out = workdir / "cluster"
    results = _finished(cluster.train(out), out)
    placement = json.loads((out / "parameter_servers.json").read_text())
    for layer in ("user_user_id_embedding", "item_item_id_embedding", "user_dense_0", "item_dense_0"):
        for variable in ("weight", "weight_owner", "weight_gradient_mask", "mask"):
            entry = placement[f"{layer}/{variable}"]
            assert entry["partitioned"], (layer, variable)
            # Two row blocks, shard i on ps task i for the table and its same-shaped owners and masks.
            assert [s["device"] for s in entry["shards"]] == [f"/job:ps/replica:0/task:{i}/device:CPU:0"
                                                              for i in range(2)], (layer, variable, entry)
            assert sum(s["rows"] for s in entry["shards"]) == entry["shape"][0]
    assert not placement["user_user_segment_embedding/weight"]["partitioned"]
    _check_run(out, results, reference(), data)


def test_parameter_server_run_survives_a_killed_worker(cluster, reference, data, workdir):
    cluster.ensure_running()
    out = workdir / "killed"
    coordinator = cluster.train(out)
    deadline = time.time() + RUN_S
    # Mid-stage: stage 1 has finished an epoch and goes on training on both workers.
    while not re.search(r"stage 1/2 exposure\s+epoch\s+1 ", _log(coordinator)):
        assert coordinator.poll() is None, _log(coordinator)[-3000:]
        assert time.time() < deadline, "stage 1 never finished an epoch"
        time.sleep(0.2)
    worker = cluster.tasks["worker", 1]
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    results = _finished(coordinator, out)
    # The coordinator saw the worker fail and gave its steps to the other worker.
    assert "Worker /job:worker/replica:0/task:1 failed" in _log(coordinator)
    _check_run(out, results, reference(), data)
