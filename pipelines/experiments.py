"""Baselines, ablations, sensitivity sweeps and a reproducible results report, in one command.

    python -m pipelines.experiments --dataset synthetic --mode full --out results/synthetic
    python -m pipelines.experiments --dataset beibei --mode full --out results/beibei
    python -m pipelines.experiments --dataset csv --data-path my.csv --csv-spec spec.json --mode full --out results/mine
    python -m pipelines.experiments --mode quick --out /tmp/quick        # CI: tiny data and towers, 2 seeds

Writes ``<out>/report.md``, ``<out>/results.json`` and PNG plots. Protocol: docs/experiments.md and
:mod:`csmf_tf.experiments.runner`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

from pipelines.common import add_data_arguments, add_shared_training_arguments, load_table
from pipelines.train_cascade import floats

from csmf_tf.data.prepared import prepare
from csmf_tf.data.synthetic import generate_cascade
from csmf_tf.data.table import InteractionTable
from csmf_tf.experiments.methods import Context, HyperParams, registry
from csmf_tf.experiments.report import summary_table, verdict, write_report
from csmf_tf.experiments.runner import Budget, Progress, Runner
from csmf_tf.metrics.protocol import EXCLUSION_RULES, SEEN
from csmf_tf.models.towers import TowerConfig
from csmf_tf.training.stages import TrainingConfig


@dataclasses.dataclass(frozen=True)
class Mode:
    """A mode's training configuration, tuning budget and data size limits."""

    config: TrainingConfig
    budget: Budget
    num_experts: int = 3
    max_users: int | None = None        # keep this many users (random, seeded) of a real dataset
    synthetic_size: tuple[int, int, int] | None = None   # (users, items, exposures); None: default dataset
    eager: bool = False                 # quick mode: tiny fits cost less eagerly than traced
    dataset_grids: dict = dataclasses.field(default_factory=dict)   # {dataset: grid} replacing budget.grid


def _grid(learning_rates, temperatures) -> tuple[HyperParams, ...]:
    return tuple(HyperParams(lr, t) for lr in learning_rates for t in temperatures)


MODES = {
    # CI: tiny data and towers, 2 seeds, a 2-point grid, 2-point sweeps; minutes on 2 cores.
    "quick": Mode(
        config=TrainingConfig(tower=TowerConfig(8, 4, (16,), 8), batch_size=512, max_epochs=2, patience=1,
                              recovery_max_epochs=1, min_output_units=2, tau=(0.3, 0.3), eta=0.0),
        budget=Budget(grid=_grid((3e-3,), (0.1,)), seeds=(0, 1), tau_values=(0.15, 0.3),
                      eta_values=(0.0, 0.5), fusion_values=(0.0, 1.0, 4.0)),
        num_experts=2, max_users=300, synthetic_size=(200, 120, 3000), eager=True),
    # The committed reports: the method's default towers (section 9), 3 seeds, a 2-point grid. Every fit
    # runs until early stopping decides (the epoch cap is far above where any method stopped).
    "full": Mode(
        config=TrainingConfig(batch_size=1024, max_epochs=40, patience=2, recovery_max_epochs=3,
                              tau=(0.3, 0.3), eta=0.0),
        budget=Budget(grid=_grid((1e-3, 3e-3), (0.05, 0.1)), seeds=(0, 1, 2),
                      tau_values=(0.1, 0.3, 0.6), eta_values=(0.0, 0.25, 0.5, 1.0),
                      fusion_values=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)),
        # Synthetic: lr 3e-3 from exposure-only pilots (docs/experiments.md). Beibei: every fit peaks after
        # its first epoch at lr 1e-3, so the grid adds 3e-4 (from a one-seed pilot at T 0.05 and 0.2 with
        # the same scores within noise); two points keep each report under an hour on 2 cores.
        # MovieLens: two points like the others (lr 1e-3 and 3e-3 at T 0.05), chosen before any run.
        dataset_grids={"synthetic": _grid((3e-3,), (0.05, 0.1)), "beibei": _grid((3e-4, 1e-3), (0.05,)),
                       "movielens": _grid((1e-3, 3e-3), (0.05,))}),
}


def subsample_users(table: InteractionTable, max_users: int, seed: int) -> InteractionTable:
    """Rows of ``max_users`` users drawn at random (seeded); the whole table when it has fewer."""
    import numpy as np

    users = np.unique(table.user_id.astype(str))
    if len(users) <= max_users:
        return table
    keep = np.random.default_rng(seed).choice(users, max_users, replace=False)
    return table.take(np.isin(table.user_id.astype(str), keep))


def load(args: argparse.Namespace, mode: Mode) -> InteractionTable:
    if args.dataset == "synthetic" and mode.synthetic_size and not args.num_users:
        users, items, exposures = mode.synthetic_size
        return generate_cascade(users, items, exposures, seed=args.data_seed)
    table = load_table(args)
    limit = args.max_users or (mode.max_users if args.dataset != "synthetic" else None)
    return subsample_users(table, limit, args.data_seed) if limit else table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--out", help="results folder (report.md, results.json, PNGs)")
    parser.add_argument("--render", metavar="FOLDER",
                        help="only re-render report.md and the PNGs of FOLDER from its results.json")
    parser.add_argument("--summary", metavar="FOLDER", nargs="+",
                        help="only print the README summary (table and verdict) of finished reports")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--learning-rates", help="grid override, comma-separated")
    parser.add_argument("--temperatures", help="grid override, comma-separated")
    parser.add_argument("--max-epochs", type=int, help="override the mode's epochs per fit")
    parser.add_argument("--output-dim", type=int, help="override the tower output dimension D")
    parser.add_argument("--max-users", type=int, help="keep this many random users of the dataset")
    parser.add_argument("--methods", help="comma-separated subset of method names (default: all)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the tau / eta / fusion sweeps")
    parser.add_argument("--work-dir", help="checkpoint scratch folder (default: a temporary folder)")
    parser.add_argument("--study", action="store_true",
                        help="instead of the experiments: the popularity tuning study (study.md, study.json)")
    parser.add_argument("--exclusion", choices=EXCLUSION_RULES, default=SEEN,
                        help="pairs left out of each user's ranking: every training (and, for test, validation) "
                             "pair ('seen', default) or only the objective's positives ('objective')")
    parser.add_argument("--no-prior", action="store_true", help="score every method without the popularity prior")
    add_shared_training_arguments(parser)
    parser.add_argument("--threads", type=int, help="TensorFlow intra- and inter-op threads (default: all)")
    parser.add_argument("--verbose", type=int, default=0)
    return parser.parse_args(argv)


def configure(args: argparse.Namespace, table: InteractionTable) -> tuple[Mode, TrainingConfig, Budget]:
    mode = MODES[args.mode]
    stages = len(table.objectives)
    config = dataclasses.replace(mode.config, objectives=tuple(table.objectives), fusion_weights=(1.0,) * stages,
                                 tau=(mode.config.tau[0],) * (stages - 1))
    if args.max_epochs:
        config = dataclasses.replace(config, max_epochs=args.max_epochs)
    if args.output_dim:
        config = dataclasses.replace(config, tower=dataclasses.replace(config.tower, output_dim=args.output_dim))
    budget = dataclasses.replace(mode.budget, grid=mode.dataset_grids.get(args.dataset, mode.budget.grid))
    grid_lr = floats(args.learning_rates, "--learning-rates") if args.learning_rates else tuple(dict.fromkeys(
        h.learning_rate for h in budget.grid))
    grid_t = floats(args.temperatures, "--temperatures") if args.temperatures else tuple(dict.fromkeys(h.temperature for h in budget.grid))
    budget = dataclasses.replace(budget, grid=_grid(grid_lr, grid_t))
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.no_prior:
        config = dataclasses.replace(config, popularity_prior=False)
    config = dataclasses.replace(config, optimizer=args.optimizer, sparse_embeddings=args.sparse_embeddings,
                                 hard_negative_correction=args.hard_negative_correction)
    if args.no_sweeps:
        budget = dataclasses.replace(budget, tau_values=(), eta_values=(), fusion_values=())
    return mode, config, budget


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.summary:
        import json
        for folder in args.summary:
            result = json.loads((Path(folder) / "results.json").read_text())
            print(f"### {result['dataset']} ({folder})\n\n{summary_table(result)}\n\n" + "\n".join(verdict(result)) + "\n")
        return {}
    if args.render:
        import json
        result = json.loads((Path(args.render) / "results.json").read_text())
        write_report(result, args.render)
        return result
    if not args.out:
        raise SystemExit("--out is required")
    started = time.time()
    load_at_start = os.getloadavg()[0]
    progress = Progress(lambda line: print(line, flush=True))
    mode = MODES[args.mode]
    import tensorflow as tf
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if mode.eager:
        tf.config.run_functions_eagerly(True)
    table = load(args, mode)
    mode, config, budget = configure(args, table)
    data = prepare(table, seed=args.data_seed, exclusion=args.exclusion, split=args.split)
    if args.study:
        return run_study_command(args, data, config, budget, started, progress, argv)
    methods = registry(config.objectives, config.eta)
    if args.methods:
        wanted = set(args.methods.split(","))
        unknown = wanted - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
        wanted |= {p for m in methods if m.name in wanted for p in m.parts + ((m.same_runs_as,) if m.same_runs_as else ())}
        methods = [m for m in methods if m.name in wanted]
    context = Context(data, config, num_experts=mode.num_experts,
                      work_dir=Path(args.work_dir) if args.work_dir else None, verbose=args.verbose)
    progress(f"{len(methods)} methods, grid {[h.key for h in budget.grid]}, seeds {list(budget.seeds)}; "
             f"scratch {context.work_dir}")
    result = Runner(context, methods, budget, progress).run()
    result.update({
        "dataset": args.dataset, "mode": args.mode, "objectives": list(config.objectives),
        "exclusion": data.validation.exclusion,
        "command": "python -m pipelines.experiments " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "seconds": time.time() - started,
        # CPU time does not depend on what else the machine runs; wall time does (shared cores).
        "cpu_seconds": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "base_config": config.to_json(), "budget": budget.to_json(), "num_experts": mode.num_experts,
        "data": {"rows": len(data.table), "users": len(data.users), "items": len(data.items),
                 "positives": {o: int(data.table.positives(o).sum()) for o in config.objectives},
                 "split": [len(data.train), len(data.val), len(data.test)], "split_method": data.split,
                 "test_users": {o: int(e.num_users) for o, e in data.testing.eval_sets.items()}},
    })
    paths = write_report(result, args.out)
    progress(f"report written: {paths['markdown']} ({result['seconds'] / 60:.1f} min)")
    context.cleanup()
    return result


def run_study_command(args, data, config: TrainingConfig, budget: Budget, started: float, progress,
                      argv) -> dict:
    """The popularity tuning study (:mod:`csmf_tf.experiments.study`), starting from the first grid point."""
    import json

    from csmf_tf.experiments.study import Setting, run_study, study_markdown

    hp = budget.grid[0]
    start = Setting(dim=config.tower.output_dim, temperature=hp.temperature, learning_rate=hp.learning_rate)
    study = run_study(data, config, start, config.objectives, progress=progress)
    command = "python -m pipelines.experiments " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study.update({"command": command, "seconds": time.time() - started, "dataset": args.dataset})
    (out / "study.json").write_text(json.dumps(study, indent=1, default=float))
    (out / "study.md").write_text(study_markdown(study, command, study["seconds"]))
    progress(f"study written: {out / 'study.md'}")
    return study


if __name__ == "__main__":
    main()
