"""Adding an objective later against training it from the start, over seeds, with a report.

    python -m pipelines.extend_study --out docs/results/extend                  # default synthetic data and towers
    python -m pipelines.extend_study --num-users 1000 --num-items 600 --num-exposures 40000 --out /tmp/extend

Per seed: the cascade over all --objectives from the start; the same cascade without its last objective,
with capacity reserved after its last stage (the last --tau), then extended by the last objective; and
the shorter cascade without a reserve. The same data, training flags and budget for all
(csmf_tf/experiments/extension.py). Checkpoints go to --work (resumable); report.md and results.json
to --out.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from pipelines.common import (add_data_arguments, add_output_arguments, check_objectives, check_prepared,
                              configure_output, load_table)
from pipelines.train_cascade import add_training_arguments, config_from_args

from csmf_tf.data.prepared import prepare
from csmf_tf.experiments.extension import run_extension_study, write_extension_report
from csmf_tf.experiments.runner import Progress


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--work", default="runs/extend_study", help="checkpoints of every run (resumable)")
    parser.add_argument("--out", default="docs/results/extend", help="report.md and results.json")
    parser.add_argument("--render", action="store_true", help="only write report.md again from <out>/results.json")
    add_output_arguments(parser)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    started = time.time()
    if args.render:
        study = json.loads((Path(args.out) / "results.json").read_text())
        report = write_extension_report(study, Path(args.out), study["command"], study["data"], study["seconds"])
        print(report.read_text())
        return study
    verbose = configure_output(args.verbose)
    config = config_from_args(args)
    if config.reserve_tau is not None:
        parser.error("--reserve-tau is the study's to set (the last --tau); leave it out")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    table = load_table(args)
    check_objectives(table, config.objectives, args)
    data = prepare(table, seed=args.data_seed, split=args.split)
    check_prepared(data, args)
    note = (f"Data: --dataset {args.dataset}" + (f" ({args.num_users:,} users, {args.num_items:,} items, "
                                                 f"{args.num_exposures:,} exposures)" if args.num_users else
                                                 " (the default size)" if args.dataset == "synthetic" else "")
            + f": {len(table):,} rows, {len(data.users):,} users, {len(data.items):,} items; positives "
            + ", ".join(f"{o} {int(table.positives(o).sum()):,}" for o in table.objectives) + ".")
    study = run_extension_study(data, config, Path(args.work), seeds, verbose=verbose,
                                progress=Progress())
    command = "python -m pipelines.extend_study " + " ".join(shlex.quote(a) for a in
                                                               (argv if argv is not None else sys.argv[1:]))
    report = write_extension_report(study, Path(args.out), command, note, time.time() - started)
    print(report.read_text())
    return study


if __name__ == "__main__":
    main()
