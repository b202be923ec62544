"""Largest user-id embedding row after stage 1 of parameter-server runs, with Adam and with lazy Adam.

Why: two cluster runs once ended stage 1 with a few user-id rows three orders of magnitude above the rest
(README, "Training at scale"). This probe starts the cluster of ``tests/test_parameter_servers.py`` (2
parameter servers, 2 workers on 127.0.0.1), runs that test's training command as chief ``--repeats``
times per optimizer, loads each stage-1 checkpoint and prints one JSON line per run:
``max_abs_user_id_row`` (one process: about 0.1-0.17 in this setting), exposure and click Recall@50.

    python benchmarks/probe_parameter_servers.py --repeats 3 -- --max-epochs 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import numpy as np  # noqa: E402

import test_parameter_servers as cluster_test  # noqa: E402  (the test's cluster and command)
from csmf_tf.data.prepared import prepare  # noqa: E402
from csmf_tf.data.synthetic import generate_cascade  # noqa: E402
from csmf_tf.training import checkpoints  # noqa: E402
from csmf_tf.training.stages import TrainingConfig, build_model  # noqa: E402


def largest_user_id_row(out: Path, data) -> float:
    config = TrainingConfig.from_json(json.loads((out / "stage_1" / "config.json").read_text()))
    model = build_model(config, data.users, data.items, data.table.feature_kinds, factorized_metrics=False)
    checkpoints.load_stage(model, out, 1)
    table = [w.layer.owned_weight.numpy() for t in model.towers for w in t.wrappers if "user_id" in w.layer.name][0]
    return float(np.abs(table).max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="flags appended to the test's training command (after --)")
    args = parser.parse_args(argv)
    data = prepare(generate_cascade(300, 200, 12000, seed=3))   # the test's data (cluster_test.SIZE)
    work = Path(tempfile.mkdtemp(prefix="ps-probe-"))
    cluster = cluster_test.Cluster(work)
    try:
        cluster.wait_serving()
        for repeat in range(args.repeats):
            for optimizer in ("adam", "lazy_adam"):
                out = work / f"{optimizer}_{repeat}"
                start = time.time()
                chief = cluster_test._start(
                    cluster_test.COMMAND + cluster_test.PARAMETER_SERVERS + ["--optimizer", optimizer, *args.extra,
                                                                            "--out", str(out)],
                    out.with_suffix(".log"), {"type": "chief", "index": 0}, cluster.spec)
                if chief.wait(cluster_test.RUN_S) != 0:
                    raise SystemExit(f"{optimizer} run {repeat} failed:\n{cluster_test._log(chief)[-3000:]}")
                stage = json.loads((out / "results.json").read_text())["stage"]
                print(json.dumps({"optimizer": optimizer, "repeat": repeat,
                                  "max_abs_user_id_row": largest_user_id_row(out, data),
                                  "exposure_recall@50": stage["exposure/recall@50"],
                                  "click_recall@50": stage["click/recall@50"],
                                  "seconds": round(time.time() - start)}), flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
