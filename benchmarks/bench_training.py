"""CSMF training step cost against a plain TFRS two-tower as the item catalogue grows.

    python benchmarks/bench_training.py                                  # 10^4, 10^5, 10^6 items
    python benchmarks/bench_training.py --sizes 10000 --optimizers lazy_adam --steps 5

Both models are id-only two-towers of the default sizes (``TowerConfig``: id embedding 64, Dense
256 -> 128 -> 64 on each side; ``--num-users`` users), trained on the same batches (``--batch-size``
uniform random (user, item) pairs; stage 2 adds one uniform random hard negative per row, as CSMF's
later stages do) with the same ``tfrs.tasks.Retrieval`` settings (temperature 0.05, accidental hits
removed, on integer keys from ``csmf_tf.tasks.aml.hit_keys`` in both):

- **plain**: ordinary tf-keras ``StringLookup`` / ``Embedding`` / ``Dense`` layers and ``tfrs.tasks.Retrieval``;
- **csmf**: :func:`csmf_tf.training.stages.build_model` (masked layers in tfmot wrappers). After its
  stage-1 steps it runs CPP (``selective_mask``, tau 0.3) and ``set_stage(2)`` with fresh units, so the
  stage-2 steps have masks, gradient masks and wrappers all active. The plain model simply goes on.

Each stage compiles a fresh optimizer, as every CSMF fit does. Per ``--optimizers`` entry both models
use the same optimizer: ``adam`` is tf-keras Adam with CSMF's default layout (tfmot rewrites each table
on every forward pass); ``lazy_adam`` is :class:`~csmf_tf.training.optimizers.LazyAdam`, with
``sparse_embeddings=True`` for CSMF (row-masked embeddings, per-column owners).

Step time: one process builds both models and alternates them step by step (the machine may be shared,
so both see the same load): ``--warmup`` untimed steps (tracing), then ``--steps`` timed steps per
stage; the median per model (over ``--rounds`` such processes, the median of medians), in wall-clock
time and in process CPU time (all threads; less sensitive to other jobs on a shared machine). Peak memory:
each model in its own process (``ru_maxrss``: building, stage 1, CPP and stage 2, ``--memory-steps`` steps
per stage), read after stage 1 and at the end. The 1-minute load average is recorded around every
process. Output: a table and ``--out`` (JSON: ``rows``, ``targets``, every run).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("plain", "csmf")
#: Targets (docs/results/training/README.md): CSMF's step at the largest catalogue vs the smallest, and
#: CSMF vs the plain two-tower with the same optimizer.
FLAT_TARGET, TIME_TARGET, MEMORY_TARGET = 1.3, 1.10, 1.25


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------ one measurement

def plain_two_tower(users, items, tower, temperature: float):
    """The baseline: tf-keras StringLookup/Embedding/Dense towers of ``tower``'s sizes, TFRS retrieval."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    from csmf_tf.data.features import HARD_NEGATIVE_ITEM_ID, ITEM_ID, USER_ID
    from csmf_tf.layers.lookup import string_lookup
    from csmf_tf.tasks.aml import hit_keys

    def build(name: str, ids) -> tf.keras.Model:
        inputs = tf.keras.Input(shape=(), dtype=tf.string, name=name)
        vocabulary = sorted({str(v) for v in ids})   # as build_tower reads a catalog's ids
        x = tf.keras.layers.Embedding(len(vocabulary) + 1, tower.id_embedding_dim)(
            string_lookup(vocabulary, f"{name}_lookup")(inputs))
        for units in tower.hidden_units:
            x = tf.keras.layers.Dense(units, activation="relu")(x)
        return tf.keras.Model(inputs, tf.keras.layers.Dense(tower.output_dim)(x), name=name)

    class PlainTwoTower(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user_model, self.item_model = build(USER_ID, users.ids), build(ITEM_ID, items.ids)
            self.task = tfrs.tasks.Retrieval(temperature=temperature, remove_accidental_hits=True)

        def compute_loss(self, features, training=False):
            query = self.user_model(features[USER_ID], training=training)
            candidates = self.item_model(features[ITEM_ID], training=training)
            ids = features[ITEM_ID]
            if HARD_NEGATIVE_ITEM_ID in features:   # extra candidates for every query
                candidates = tf.concat([candidates, self.item_model(features[HARD_NEGATIVE_ITEM_ID],
                                                                    training=training)], axis=0)
                ids = tf.concat([ids, features[HARD_NEGATIVE_ITEM_ID]], axis=0)
            # Integer keys for the accidental-hit mask, as CSMF's task uses (csmf_tf.tasks.aml.hit_keys):
            # like for like, so the ratio measures the masking and not the id comparison.
            return self.task(query, candidates, candidate_ids=hit_keys(ids), compute_metrics=False)

    return PlainTwoTower()


def session(kinds: list[str], num_items: int, num_users: int, optimizer: str, batch_size: int, warmup: int,
            steps: int, seed: int) -> dict[str, Any]:
    """Build the models ``kinds``, train stage 1 then stage 2 (CSMF: after CPP), one step of each model in
    turn; per stage and model the median step time, and the peak RSS after each stage."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from csmf_tf.data.features import HARD_NEGATIVE_ITEM_ID, HARD_NEGATIVE_MASK, ITEM_ID, USER_ID
    from csmf_tf.data.table import Catalog
    from csmf_tf.training.optimizers import LAZY_ADAM, make_optimizer
    from csmf_tf.training.selective_mask import selective_mask
    from csmf_tf.training.stages import TrainingConfig, build_model

    out: dict[str, Any] = {"baseline_rss_mb": peak_rss_mb()}
    users = Catalog(np.array([f"u{k}" for k in range(num_users)], dtype=object), {})
    items = Catalog(np.array([f"i{k}" for k in range(num_items)], dtype=object), {})
    config = TrainingConfig(optimizer=optimizer, sparse_embeddings=optimizer == LAZY_ADAM, seed=seed)
    models = {}
    for kind in kinds:
        start = time.perf_counter()
        models[kind] = (plain_two_tower(users, items, config.tower, config.temperature) if kind == "plain"
                        else build_model(config, users, items, {}, factorized_metrics=False))
        out[f"{kind}_build_seconds"] = time.perf_counter() - start

    rng = np.random.default_rng(seed)   # the same batches for every model
    count = 8
    for stage in (1, 2):
        columns = {USER_ID: users.ids[rng.integers(0, num_users, (count, batch_size))].astype(str),
                   ITEM_ID: items.ids[rng.integers(0, num_items, (count, batch_size))].astype(str)}
        if stage == 2:
            columns[HARD_NEGATIVE_ITEM_ID] = items.ids[rng.integers(0, num_items, (count, batch_size))].astype(str)
            columns[HARD_NEGATIVE_MASK] = np.ones((count, batch_size), np.float32)
            if "csmf" in models:
                start = time.perf_counter()
                selective_mask(models["csmf"], 1, config.tau[0], config.granularity, config.min_output_units)
                models["csmf"].set_stage(2, reinitialise=True, seed=seed + 2000, zero_item_block=config.zero_item_block)
                out["csmf_cpp_seconds"] = time.perf_counter() - start
        dataset = tf.data.Dataset.from_tensor_slices(columns).repeat()
        steppers = {}
        for kind, model in models.items():   # a fresh optimizer per stage, as every CSMF fit has
            model.compile(optimizer=make_optimizer(optimizer, config.learning_rate))
            pruning = tfmot.sparsity.keras.UpdatePruningStep()   # what every CSMF fit runs (nothing for plain)
            pruning.set_model(model)
            pruning.on_train_begin()
            steppers[kind] = (model.make_train_function(), iter(dataset))
        wall: dict[str, list[float]] = {kind: [] for kind in models}
        cpu: dict[str, list[float]] = {kind: [] for kind in models}
        for _ in range(warmup + steps):
            for kind, (train, batches) in steppers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                loss = float(train(batches)["loss"])
                wall[kind].append((time.perf_counter() - start) * 1e3)
                cpu[kind].append((time.process_time() - start_cpu) * 1e3)
                if not np.isfinite(loss):
                    raise RuntimeError(f"{kind} stage {stage}: loss is {loss}")
        out[f"stage_{stage}"] = {kind: {"ms_per_step": statistics.median(wall[kind][warmup:]),
                                        "cpu_ms_per_step": statistics.median(cpu[kind][warmup:]),
                                        "step_ms": [round(x, 2) for x in wall[kind][warmup:]],
                                        "step_cpu_ms": [round(x, 2) for x in cpu[kind][warmup:]],
                                        "warmup_ms": [round(x, 1) for x in wall[kind][:warmup]]} for kind in models}
        out[f"stage_{stage}_peak_rss_mb"] = peak_rss_mb()
        steppers.clear()
        gc.collect()   # the stage's optimizer (its moment tables) goes before the next stage builds its own
    return out


# ------------------------------------------------------------------------------ driver

def run_child(args: argparse.Namespace, kinds: list[str], num_items: int, optimizer: str, warmup: int,
              steps: int) -> dict[str, Any]:
    """One :func:`session` in a fresh interpreter (its own peak RSS)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(kinds), "--sizes", str(num_items),
               "--optimizers", optimizer, "--num-users", str(args.num_users), "--batch-size", str(args.batch_size),
               "--warmup", str(warmup), "--steps", str(steps), "--seed", str(args.seed)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{kinds} {num_items} {optimizer} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(kinds=kinds, num_items=num_items, optimizer=optimizer, wall_seconds=time.perf_counter() - start,
                  load_1min_before=load_before, load_1min_after=os.getloadavg()[0])
    text = "  ".join(f"stage {s}: " + ", ".join(f"{k} {result[f'stage_{s}'][k]['ms_per_step']:.1f} ms" for k in kinds)
                     + f" (peak {result[f'stage_{s}_peak_rss_mb']:.0f} MiB)" for s in (1, 2))
    print(f"  {'+'.join(kinds):<10} {num_items:>9,} items  {optimizer:<9}  {text}  [{result['wall_seconds']:.0f} s, "
          f"load {load_before:.1f}]", flush=True)
    return result


def summarise(timing: list[dict], memory: list[dict], sizes: list[int], optimizers: list[str]) -> dict:
    rows = []
    for optimizer in optimizers:
        for stage in (1, 2):
            for size in sizes:
                def pick(runs, kind=None):
                    return [r for r in runs if (r["num_items"], r["optimizer"]) == (size, optimizer)
                            and (kind is None or r["kinds"] == [kind])]
                ms, cpu = ({m: statistics.median(r[f"stage_{stage}"][m][key] for r in pick(timing)) for m in MODELS}
                           for key in ("ms_per_step", "cpu_ms_per_step"))
                peak = {m: statistics.median(r[f"stage_{stage}_peak_rss_mb"] for r in pick(memory, m))
                        for m in MODELS}
                rows.append({"num_items": size, "stage": stage, "optimizer": optimizer,
                             "sparse_embeddings": optimizer == "lazy_adam",
                             "plain_ms": round(ms["plain"], 2), "csmf_ms": round(ms["csmf"], 2),
                             "time_ratio": round(ms["csmf"] / ms["plain"], 3),
                             "plain_cpu_ms": round(cpu["plain"], 2), "csmf_cpu_ms": round(cpu["csmf"], 2),
                             "cpu_time_ratio": round(cpu["csmf"] / cpu["plain"], 3),
                             "plain_peak_mb": round(peak["plain"], 1), "csmf_peak_mb": round(peak["csmf"], 1),
                             "memory_ratio": round(peak["csmf"] / peak["plain"], 3)})
    targets = []
    for optimizer in optimizers:
        for stage in (1, 2):
            mine = [r for r in rows if (r["optimizer"], r["stage"]) == (optimizer, stage)]
            flat = mine[-1]["csmf_ms"] / mine[0]["csmf_ms"]
            flat_cpu = mine[-1]["csmf_cpu_ms"] / mine[0]["csmf_cpu_ms"]
            targets.append({
                "optimizer": optimizer, "stage": stage,
                "csmf_ms_largest_over_smallest": round(flat, 3), "flat_met": flat <= FLAT_TARGET,
                "csmf_cpu_ms_largest_over_smallest": round(flat_cpu, 3), "flat_cpu_met": flat_cpu <= FLAT_TARGET,
                "max_time_ratio": max(r["time_ratio"] for r in mine),
                "time_ratio_met": all(r["time_ratio"] <= TIME_TARGET for r in mine),
                "max_cpu_time_ratio": max(r["cpu_time_ratio"] for r in mine),
                "cpu_time_ratio_met": all(r["cpu_time_ratio"] <= TIME_TARGET for r in mine),
                "max_memory_ratio": max(r["memory_ratio"] for r in mine),
                "memory_ratio_met": all(r["memory_ratio"] <= MEMORY_TARGET for r in mine)})
    return {"rows": rows, "targets": targets}


def format_table(summary: dict) -> str:
    lines = ["| optimizer | stage | items | plain ms/step | CSMF ms/step | time ratio | plain CPU ms | CSMF CPU ms | "
             "CPU ratio | plain peak MiB | CSMF peak MiB | memory ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['optimizer']} | {r['stage']} | {r['num_items']:,} | {r['plain_ms']:,.1f} | "
                     f"{r['csmf_ms']:,.1f} | {r['time_ratio']:.2f} | {r['plain_cpu_ms']:,.1f} | "
                     f"{r['csmf_cpu_ms']:,.1f} | {r['cpu_time_ratio']:.2f} | {r['plain_peak_mb']:,.0f} | "
                     f"{r['csmf_peak_mb']:,.0f} | {r['memory_ratio']:.2f} |")

    def mark(value: float, ok: bool) -> str:
        return f"{value:.2f} ({'met' if ok else 'NOT met'})"

    lines += ["", f"| optimizer | stage | CSMF largest/smallest, wall (<= {FLAT_TARGET}) | same, CPU | "
              f"max time ratio, wall (<= {TIME_TARGET}) | same, CPU | max memory ratio (<= {MEMORY_TARGET}) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t in summary["targets"]:
        lines.append(f"| {t['optimizer']} | {t['stage']} | "
                     f"{mark(t['csmf_ms_largest_over_smallest'], t['flat_met'])} | "
                     f"{mark(t['csmf_cpu_ms_largest_over_smallest'], t['flat_cpu_met'])} | "
                     f"{mark(t['max_time_ratio'], t['time_ratio_met'])} | "
                     f"{mark(t['max_cpu_time_ratio'], t['cpu_time_ratio_met'])} | "
                     f"{mark(t['max_memory_ratio'], t['memory_ratio_met'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="item catalogue sizes, comma-separated")
    parser.add_argument("--optimizers", default="adam,lazy_adam")
    parser.add_argument("--num-users", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per stage and model (tracing)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage and model")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per stage in the peak-RSS runs")
    parser.add_argument("--rounds", type=int, default=1, help="timing runs per configuration (median kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "training" / "bench_training.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.memory_steps < 2 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0, --memory-steps >= 2")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    optimizers = args.optimizers.split(",")

    if args.child:  # one session; JSON on the last stdout line
        import csmf_tf  # noqa: F401  (tf-keras before TensorFlow)
        print(json.dumps(session(args.child.split(","), sizes[0], args.num_users, optimizers[0], args.batch_size,
                                 args.warmup, args.steps, args.seed)))
        return 0

    began, load_start = time.time(), os.getloadavg()
    timing, memory = [], []
    for size in sizes:
        for optimizer in optimizers:
            for _ in range(args.rounds):
                timing.append(run_child(args, list(MODELS), size, optimizer, args.warmup, args.steps))
            for model in MODELS:
                memory.append(run_child(args, [model], size, optimizer, 1, args.memory_steps - 1))
    summary = summarise(timing, memory, sizes, optimizers)
    table = format_table(summary)
    print(table)
    write_results({**summary, "command": " ".join(["python benchmarks/bench_training.py", *(argv or sys.argv[1:])]),
                   "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                               "note": "the 1-minute load average is recorded with every run"},
                   "seconds": time.time() - began, "table": table, "timing_runs": timing, "memory_runs": memory},
                  args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
