"""Streaming input from TFRecord shards vs the in-memory path: examples per second and peak memory; and
what a later stage reads from positive shards vs a scan of every record.

    python -m benchmarks.bench_streaming                       # 10^6 and 10^7 exposures
    python -m benchmarks.bench_streaming --sizes 1000000 --train-steps 100
    python -m benchmarks.bench_streaming --sizes 10000000 --phases stage_reads \
        --out docs/results/training/bench_streaming.json      # later stages: positive shards vs scan

For each size the data is generated chunk by chunk into ``--data-dir`` (cached: a later run reuses it),
then every measurement runs in its own subprocess, so each peak RSS (``ru_maxrss``) belongs to one phase:

- ``generate``: :func:`write_cascade_tfrecord` (only when not cached);
- ``stream_input``: :class:`TFRecordSource` first pass, then one full epoch of the exposure dataset
  (and of the click dataset with cascade hard negatives, whose index the first use builds);
- ``stream_train``: one ``fit`` of a small model on the streamed exposure data, ``--train-steps`` steps;
- ``memory_input`` / ``memory_train`` (sizes up to ``--memory-max``): the same on the in-memory path
  (``read_tfrecord`` of the shards, then :func:`make_objective_dataset`);
- ``stage_reads``: per later stage (click, conversion), what it reads and how long it takes, measured in
  one process for a source that scans every record (``positive_shards=False``) and one that reads the
  positive shards: the hard-negative index pass (records, bytes, seconds) and one epoch of the stage's
  training data as training builds it (catalog items, cascade hard negatives). Records read are the
  records of the files the pass reads (:meth:`TFRecordSource.epoch_files`); bytes read are measured by
  the kernel (``rchar`` of ``/proc/self/io``: every byte this process read through ``read``);
- ``add_positive_shards``: :func:`write_positive_shards`, only when cached shards have none (written by
  an older version), before ``stage_reads``.

Input epochs run ``--repeats`` times, the fastest is kept (the machine may be shared; the 1-minute load
average after each phase is recorded). Examples per second of ``*_train`` exclude the first
``--warmup-steps`` steps (tracing). ``baseline_rss``
is the process' peak RSS after importing TensorFlow and building nothing. Results: a table on stdout and
JSON in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from csmf_tf.data.files import positives_manifest_path

REPO = Path(__file__).resolve().parents[1]
#: users, items and shards per number of exposures (~100 exposures per user).
SHAPES = {1_000_000: (20_000, 5_000, 8), 10_000_000: (100_000, 10_000, 16)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def shape_for(size: int) -> tuple[int, int, int]:
    if size in SHAPES:
        return SHAPES[size]
    users = max(100, size // 50)  # ~50 exposures per user, at most 5 % of the items each
    return users, max(1_000, min(10_000, users // 2)), 8


def data_paths(data_dir: Path, size: int) -> tuple[Path, str]:
    folder = data_dir / f"n{size}"
    return folder, str(folder / "cascade-*.tfrecord")


# ------------------------------------------------------------------------------------------- phases

def phase_generate(data_dir: Path, size: int, seed: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    from csmf_tf.data.synthetic import write_cascade_tfrecord

    folder, _ = data_paths(data_dir, size)
    users, items, shards = shape_for(size)
    start = time.perf_counter()
    files = write_cascade_tfrecord(folder / "cascade", users, items, size, num_shards=shards, seed=seed)
    seconds = time.perf_counter() - start
    manifest = json.loads(files.positives_manifest.read_text())
    result = {"rows": files.rows, "users": users, "items": items, "shards": shards, "seconds": seconds,
              "rows_per_s": files.rows / seconds, "positives": files.positives,
              "bytes_on_disk": sum(p.stat().st_size for p in files.paths),
              "positive_shard_bytes": sum(p["bytes"] for s in manifest["shards"] for p in s["positives"].values()),
              "peak_rss_mb": peak_rss_mb()}
    (folder / "generated.json").write_text(json.dumps(result, indent=2))
    return result


def _iterate(ds, repeats: int = 1) -> tuple[int, float]:
    """``(rows per epoch, fastest epoch in seconds)`` over ``repeats`` full epochs (the machine is shared:
    the fastest epoch is the least disturbed one)."""
    best, rows = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = 0
        for batch in ds:
            rows += int(batch["item_id"].shape[0])
        best = min(best, time.perf_counter() - start)
    return rows, best


def phase_stream_input(data_dir: Path, size: int, batch_size: int, shuffle_buffer: int,
                       repeats: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    import tensorflow as tf  # noqa: F401
    from csmf_tf.data.streaming import TFRecordSource

    baseline = peak_rss_mb()
    _, pattern = data_paths(data_dir, size)
    start = time.perf_counter()
    source = TFRecordSource(pattern, shuffle_buffer=shuffle_buffer)
    scan = time.perf_counter() - start
    after_scan = peak_rss_mb()
    rows, seconds = _iterate(source.objective_dataset("exposure", batch_size, seed=0), repeats)
    after_epoch = peak_rss_mb()
    start = time.perf_counter()
    index = source.hard_negative_index("click")
    index_seconds = time.perf_counter() - start
    click_rows, click_seconds = _iterate(source.objective_dataset("click", batch_size, hard_negatives=True), repeats)
    return {"baseline_rss_mb": baseline, "scan_seconds": scan, "scan_rows_per_s": source.num_rows / scan,
            "held_mb": source.held_bytes() / 2**20, "peak_rss_after_scan_mb": after_scan,
            "epoch_rows": rows, "epoch_seconds": seconds, "examples_per_s": rows / seconds,
            "peak_rss_after_epoch_mb": after_epoch,
            "click_hn_index_seconds": index_seconds, "click_hn_index_mb": index.nbytes / 2**20,
            "click_hn_rows": click_rows, "click_hn_epoch_seconds": click_seconds,
            "click_hn_examples_per_s": click_rows / click_seconds,
            "peak_rss_mb": peak_rss_mb()}


def read_bytes() -> int:
    """Bytes this process has read through ``read``-family system calls so far (Linux ``rchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def phase_add_positive_shards(data_dir: Path, size: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    from csmf_tf.data.files import write_positive_shards

    _, pattern = data_paths(data_dir, size)
    start = time.perf_counter()
    manifest = write_positive_shards(pattern)
    seconds = time.perf_counter() - start
    shards = json.loads(manifest.read_text())["shards"]
    return {"seconds": seconds, "records": sum(s["records"] for s in shards),
            "positive_shard_bytes": sum(p["bytes"] for s in shards for p in s["positives"].values()),
            "peak_rss_mb": peak_rss_mb()}


def phase_stage_reads(data_dir: Path, size: int, batch_size: int, shuffle_buffer: int,
                      repeats: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    import tensorflow as tf  # noqa: F401
    from csmf_tf.data.streaming import TFRecordSource

    _, pattern = data_paths(data_dir, size)
    result: dict[str, Any] = {}
    for mode, positive_shards in (("scan", False), ("positive_shards", True)):
        start = time.perf_counter()
        source = TFRecordSource(pattern, shuffle_buffer=shuffle_buffer, positive_shards=positive_shards)
        r: dict[str, Any] = {"first_pass_seconds": time.perf_counter() - start, "rows": source.num_rows}
        for t, objective in enumerate(source.objectives[1:], start=1):
            upstream = source.objectives[t - 1]
            bytes_before, start = read_bytes(), time.perf_counter()
            index = source.hard_negative_index(objective)
            index_seconds, index_bytes = time.perf_counter() - start, read_bytes() - bytes_before
            ds = source.objective_dataset(objective, batch_size, seed=0, item_catalog=source.item_catalog(),
                                          hard_negatives=True)
            bytes_before = read_bytes()
            rows, seconds = _iterate(ds, repeats)
            r[objective] = {
                "index_records_read": source.epoch_records(upstream), "index_bytes_read": index_bytes,
                "index_seconds": index_seconds, "index_candidates": len(index.items),
                "epoch_files": len(source.epoch_files(objective)),
                "epoch_file_bytes": sum(os.path.getsize(f) for f in source.epoch_files(objective)),
                "epoch_records_read": source.epoch_records(objective),
                "epoch_bytes_read": (read_bytes() - bytes_before) / repeats,
                "epoch_seconds": seconds, "examples": rows, "examples_per_s": rows / seconds,
                "stage_records_read": source.epoch_records(upstream) + source.epoch_records(objective),
                "stage_seconds": index_seconds + seconds}
        result[mode] = r
    for objective in [k for k, v in result["scan"].items() if isinstance(v, dict)]:
        scan, positives = result["scan"][objective], result["positive_shards"][objective]
        if scan["examples"] != positives["examples"]:
            raise RuntimeError(f"{objective}: {scan['examples']} examples from the scan, {positives['examples']} "
                               "from the positive shards")
        result[f"{objective}_ratios"] = {
            key: scan[key] / positives[key] for key in ("epoch_records_read", "epoch_bytes_read", "epoch_seconds",
                                                        "stage_records_read", "stage_seconds")}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def phase_memory_input(data_dir: Path, size: int, batch_size: int, repeats: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    import tensorflow as tf  # noqa: F401
    from csmf_tf.data.files import read_tfrecord
    from csmf_tf.data.tfdata import make_objective_dataset

    baseline = peak_rss_mb()
    _, pattern = data_paths(data_dir, size)
    start = time.perf_counter()
    table = read_tfrecord(pattern)
    load = time.perf_counter() - start
    after_load = peak_rss_mb()
    start = time.perf_counter()
    ds = make_objective_dataset(table, "exposure", batch_size, seed=0)
    build = time.perf_counter() - start
    rows, seconds = _iterate(ds, repeats)
    return {"baseline_rss_mb": baseline, "load_seconds": load, "peak_rss_after_load_mb": after_load,
            "dataset_build_seconds": build, "epoch_rows": rows, "epoch_seconds": seconds,
            "examples_per_s": rows / seconds, "peak_rss_mb": peak_rss_mb()}


def _fit(dataset, users, items, feature_kinds, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from csmf_tf.models.towers import TowerConfig
    from csmf_tf.training.stages import TrainingConfig, build_model

    config = TrainingConfig(tower=TowerConfig(32, 8, (64,), 32), batch_size=batch_size)
    model = build_model(config, users, items, feature_kinds)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    marks: list[float] = []
    timer = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: marks.append(time.perf_counter()))
    start = time.perf_counter()
    model.fit(dataset.repeat(), steps_per_epoch=steps, epochs=1, verbose=0,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), timer])
    total = time.perf_counter() - start
    timed = len(marks) - warmup
    return {"steps": len(marks), "fit_seconds": total,
            "examples_per_s": timed * batch_size / (marks[-1] - marks[warmup - 1]) if timed > 0 else None}


def phase_stream_train(data_dir: Path, size: int, batch_size: int, shuffle_buffer: int, steps: int,
                       warmup: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    import tensorflow as tf  # noqa: F401
    from csmf_tf.data.streaming import TFRecordSource

    baseline = peak_rss_mb()
    _, pattern = data_paths(data_dir, size)
    source = TFRecordSource(pattern, shuffle_buffer=shuffle_buffer)
    ds = source.objective_dataset("exposure", batch_size, seed=0, drop_remainder=True)
    result = _fit(ds, source.user_catalog(), source.item_catalog(), source.feature_kinds, batch_size, steps, warmup)
    return {"baseline_rss_mb": baseline, **result, "peak_rss_mb": peak_rss_mb()}


def phase_memory_train(data_dir: Path, size: int, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    import csmf_tf  # noqa: F401
    import tensorflow as tf  # noqa: F401
    from csmf_tf.data.files import read_tfrecord
    from csmf_tf.data.tfdata import make_objective_dataset

    baseline = peak_rss_mb()
    _, pattern = data_paths(data_dir, size)
    table = read_tfrecord(pattern)
    ds = make_objective_dataset(table, "exposure", batch_size, seed=0, drop_remainder=True)
    result = _fit(ds, table.user_catalog(), table.item_catalog(), table.feature_kinds, batch_size, steps, warmup)
    return {"baseline_rss_mb": baseline, **result, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------- driver

def run_phase(args: argparse.Namespace, phase: str, size: int) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (its own peak RSS); returns its JSON result."""
    command = [sys.executable, "-m", "benchmarks.bench_streaming", "--phase", phase, "--size", str(size),
               "--data-dir", str(args.data_dir), "--batch-size", str(args.batch_size),
               "--shuffle-buffer", str(args.shuffle_buffer), "--train-steps", str(args.train_steps),
               "--warmup-steps", str(args.warmup_steps), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    print(f"[{size:,}] {phase} ...", flush=True)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} ({size}) failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average_1min_after"] = os.getloadavg()[0]  # the machine is shared: context for the numbers
    print(f"[{size:,}] {phase}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in result.items() if not isinstance(v, dict)), flush=True)
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| rows | path | phase | examples/s | seconds | peak RSS (MiB) | note |",
             "|---:|---|---|---:|---:|---:|---|"]

    def row(size, path, phase, eps, seconds, rss, note=""):
        eps_text = f"{eps:,.0f}" if eps else "-"
        lines.append(f"| {int(size):,} | {path} | {phase} | {eps_text} | {seconds:,.1f} | {rss:,.0f} | {note} |")

    for size, r in results.items():
        g = r.get("generate") or r.get("generate_cached")
        if g:
            row(size, "stream", "generate (chunked)", g["rows_per_s"], g["seconds"], g["peak_rss_mb"],
                f"{g['shards']} shards, {g['bytes_on_disk'] / 2**20:,.0f} MiB"
                + (f" + positive shards {g['positive_shard_bytes'] / 2**20:,.0f} MiB" if "positive_shard_bytes" in g else "")
                + (" (cached: measured when generated)" if "generate" not in r else ""))
        s = r.get("stream_input")
        if s:
            row(size, "stream", "first pass (scan)", s["scan_rows_per_s"], s["scan_seconds"],
                s["peak_rss_after_scan_mb"], f"source holds {s['held_mb']:.1f} MiB")
            row(size, "stream", "input epoch (exposure)", s["examples_per_s"], s["epoch_seconds"],
                s["peak_rss_after_epoch_mb"], f"baseline RSS {s['baseline_rss_mb']:,.0f}")
            row(size, "stream", "input epoch (click + HN)", s["click_hn_examples_per_s"],
                s["click_hn_epoch_seconds"], s["peak_rss_mb"],
                f"reads all {s['epoch_rows']:,} records ({s['epoch_rows'] / s['click_hn_epoch_seconds']:,.0f}/s); "
                f"HN index {s['click_hn_index_mb']:.1f} MiB built in {s['click_hn_index_seconds']:.1f}s")
        t = r.get("stream_train")
        if t:
            row(size, "stream", f"fit ({t['steps']} steps)", t["examples_per_s"], t["fit_seconds"], t["peak_rss_mb"])
        m = r.get("memory_input")
        if m:
            row(size, "memory", "load (read_tfrecord)", None, m["load_seconds"], m["peak_rss_after_load_mb"])
            row(size, "memory", "input epoch (exposure)", m["examples_per_s"], m["epoch_seconds"], m["peak_rss_mb"],
                f"dataset build {m['dataset_build_seconds']:.1f}s")
        t = r.get("memory_train")
        if t:
            row(size, "memory", f"fit ({t['steps']} steps)", t["examples_per_s"], t["fit_seconds"], t["peak_rss_mb"])
    return "\n".join(lines)


def format_stage_table(results: dict[str, dict[str, Any]]) -> str:
    """Later stages, scan vs positive shards: records/bytes read and seconds of the hard-negative index
    pass and of one epoch, and their sum (the stage with one epoch)."""
    lines = ["| exposures | stage | reads | HN index: records read | s | epoch: records read | MiB read | s "
             "| examples/s | stage (index + 1 epoch): records read | s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, r in results.items():
        reads = r.get("stage_reads")
        if not reads:
            continue
        for objective in [k for k, v in reads["scan"].items() if isinstance(v, dict)]:
            for mode in ("scan", "positive_shards"):
                m = reads[mode][objective]
                lines.append(
                    f"| {int(size):,} | {objective} | {mode.replace('_', ' ')} | {m['index_records_read']:,} | "
                    f"{m['index_seconds']:,.1f} | {m['epoch_records_read']:,} | {m['epoch_bytes_read'] / 2**20:,.0f} | "
                    f"{m['epoch_seconds']:,.1f} | {m['examples_per_s']:,.0f} | {m['stage_records_read']:,} | "
                    f"{m['stage_seconds']:,.1f} |")
            q = reads[f"{objective}_ratios"]
            lines.append(f"| {int(size):,} | {objective} | scan / positive shards | | | "
                         f"{q['epoch_records_read']:.1f}x | {q['epoch_bytes_read']:.1f}x | {q['epoch_seconds']:.1f}x | | "
                         f"{q['stage_records_read']:.1f}x | {q['stage_seconds']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="exposures, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/csmf_stream"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_streaming.json")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=65_536)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--memory-max", type=int, default=1_000_000,
                        help="run the in-memory phases only for sizes up to this")
    parser.add_argument("--repeats", type=int, default=2, help="input epochs per measurement (fastest kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="stream_input,stream_train,memory_input,memory_train,stage_reads",
                        help="comma-separated phases to run per size (data generation runs when needed)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # child process: one measurement, JSON on the last stdout line
        phases = {
            "generate": lambda: phase_generate(args.data_dir, args.size, args.seed),
            "stream_input": lambda: phase_stream_input(args.data_dir, args.size, args.batch_size, args.shuffle_buffer,
                                                       args.repeats),
            "stream_train": lambda: phase_stream_train(args.data_dir, args.size, args.batch_size,
                                                       args.shuffle_buffer, args.train_steps, args.warmup_steps),
            "memory_input": lambda: phase_memory_input(args.data_dir, args.size, args.batch_size, args.repeats),
            "memory_train": lambda: phase_memory_train(args.data_dir, args.size, args.batch_size,
                                                       args.train_steps, args.warmup_steps),
            "add_positive_shards": lambda: phase_add_positive_shards(args.data_dir, args.size),
            "stage_reads": lambda: phase_stage_reads(args.data_dir, args.size, args.batch_size, args.shuffle_buffer,
                                                     args.repeats),
        }
        print(json.dumps(phases[args.phase]()))
        return 0

    phases = [p for p in args.phases.split(",") if p]
    known = ("stream_input", "stream_train", "memory_input", "memory_train", "stage_reads")
    if set(phases) - set(known):
        parser.error(f"--phases: unknown {sorted(set(phases) - set(known))}; choose from {known}")
    results: dict[str, dict[str, Any]] = {}
    for size in (int(float(s)) for s in args.sizes.split(",")):
        folder, _ = data_paths(args.data_dir, size)
        r: dict[str, Any] = {}
        marker = folder / "generated.json"
        if marker.exists():
            r["generate_cached"] = json.loads(marker.read_text())
            print(f"[{size:,}] using cached shards in {folder}", flush=True)
        else:
            r["generate"] = run_phase(args, "generate", size)
        if "stage_reads" in phases and not positives_manifest_path(next(folder.glob("cascade-*.tfrecord"))).exists():
            r["add_positive_shards"] = run_phase(args, "add_positive_shards", size)  # shards of an older version
        for phase in phases:
            if not phase.startswith("memory_") or size <= args.memory_max:
                r[phase] = run_phase(args, phase, size)
        results[str(size)] = r
    table, stage_table = format_table(results), format_stage_table(results)
    print(table)
    print(stage_table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items() if k not in ("phase", "size")},
                                    "results": results, "table": table, "stage_table": stage_table},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
