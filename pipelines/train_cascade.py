"""Train CSMF stage by stage: pretrain exposure -> CPP -> recovery -> fine-tune click -> ... .

    python -m pipelines.train_cascade --out runs/csmf                # the whole cascade
    python -m pipelines.train_cascade --out runs/csmf --stage 2      # re-run stage 2 from stage 1's checkpoint
    python -m pipelines.train_cascade --out runs/big \
        --train-tfrecords 'data/big/cascade-*.tfrecord' --holdout data/big/cascade_holdout.tfrecord
                                                                     # stream the training rows from shards
    python -m pipelines.train_cascade --out runs/ec --objectives exposure,click --reserve-tau 0.3
    python -m pipelines.train_cascade --out runs/ecc --extend-from runs/ec --add-objective conversion
                                  # reserve capacity, later add an objective (stages 1..S stay bit-identical)

Each stage writes runs/<name>/stage_<t>/ (weights, ownership.json, config.json, metrics.json) and its
TensorBoard logs to runs/<name>/tensorboard/stage_<t>/ (`tensorboard --logdir runs/<name>/tensorboard`);
the run ends with test metrics (results.json), ownership pictures (ownership_<tower>.png) and an export
bundle (bundle/: `python -m pipelines.export --bundle runs/<name>/bundle`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.common import (add_data_arguments, add_output_arguments, add_shared_training_arguments,
                              add_streaming_arguments, check_objectives, check_prepared, configure_output,
                              load_holdout, load_table)

import tensorflow as tf

from csmf_tf.data.prepared import prepare, prepare_streaming
from csmf_tf.data.streaming import TFRecordSource
from csmf_tf.metrics.retrieval import format_results_table
from csmf_tf.training import parameter_servers
from csmf_tf.training.extend import extend_csmf
from csmf_tf.training.run import train_csmf
from csmf_tf.training.stages import TrainingConfig


DEFAULTS = TrainingConfig()


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--objectives", default="exposure,click,conversion")
    group.add_argument("--tau", default="0.3", help="CPP threshold per stage transition, comma-separated")
    group.add_argument("--reserve-tau", type=float,
                       help="CPP after the last stage too, with this tau: its units are reserved (inactive, not "
                            "served) for an objective added later with --extend-from (default: no reserve)")
    group.add_argument("--eta", type=float, default=DEFAULTS.eta,
                       help="AML margin in logit units (nats) on the positive of stages t > 1 (0: plain TFRS loss)")
    group.add_argument("--no-popularity-prior", action="store_true",
                       help="score and serve s_t without the popularity prior alpha_t log(1 + c_t(i))")
    group.add_argument("--no-start-candidate", action="store_true",
                       help="early stopping ignores the weights a fit starts from (Keras' own rule)")
    group.add_argument("--granularity", default="unit", choices=["unit", "weight"])
    group.add_argument("--min-output-units", type=int, default=4)
    group.add_argument("--no-recovery", action="store_true")
    group.add_argument("--recovery-fraction", type=float, default=1.0)
    group.add_argument("--recovery-max-epochs", type=int, default=5)
    group.add_argument("--no-hard-negatives", action="store_true")
    group.add_argument("--max-epochs", type=int, default=20)
    group.add_argument("--patience", type=int, default=2)
    group.add_argument("--batch-size", type=int, default=1024)
    group.add_argument("--learning-rate", type=float, default=1e-3)
    group.add_argument("--later-stage-batch-size", type=int, default=256,
                       help="batch size of stages after the first (they have far fewer positives)")
    group.add_argument("--later-stage-learning-rate", type=float, help="default: --learning-rate")
    group.add_argument("--temperature", type=float, default=0.05)
    group.add_argument("--output-dim", type=int, default=64)
    group.add_argument("--hidden-units", default="256,128")
    group.add_argument("--fusion-weights", default="1,1,1", help="k_d,k_o,k_r for the fused ranking")
    group.add_argument("--seed", type=int, default=0)
    add_shared_training_arguments(group)


def floats(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated floats of a command-line flag; ``SystemExit`` naming the flag otherwise."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated numbers, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The :class:`TrainingConfig` of the flags; a bad value stops with the flag's name."""
    try:
        return _config(args)
    except ValueError as error:
        raise SystemExit(f"invalid training flags (--<field> with dashes): {error}") from None


def _config(args: argparse.Namespace) -> TrainingConfig:
    from csmf_tf.models.towers import TowerConfig
    return TrainingConfig(
        objectives=tuple(args.objectives.split(",")),
        tower=TowerConfig(hidden_units=tuple(int(x) for x in args.hidden_units.split(",") if x),
                          output_dim=args.output_dim),
        temperature=args.temperature, learning_rate=args.learning_rate, batch_size=args.batch_size,
        later_stage_batch_size=args.later_stage_batch_size,
        later_stage_learning_rate=args.later_stage_learning_rate,
        max_epochs=args.max_epochs, patience=args.patience, tau=floats(args.tau, "--tau"),
        granularity=args.granularity, min_output_units=args.min_output_units, eta=args.eta,
        hard_negatives=not args.no_hard_negatives, hard_negative_correction=args.hard_negative_correction,
        recovery=not args.no_recovery,
        recovery_fraction=args.recovery_fraction, recovery_max_epochs=args.recovery_max_epochs,
        fusion_weights=floats(args.fusion_weights, "--fusion-weights"), seed=args.seed,
        popularity_prior=not args.no_popularity_prior, start_is_candidate=not args.no_start_candidate,
        optimizer=args.optimizer, sparse_embeddings=args.sparse_embeddings, reserve_tau=args.reserve_tau)


def worker_out_dir(out: Path, resolver) -> Path:
    """The chief (or worker 0 when no chief is named) writes to ``out``; others to their own folder,
    so workers never write the same checkpoint files."""
    chief = resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs)
    return out if chief else out / f".worker_{resolver.task_id}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_streaming_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--out", default="runs/csmf")
    parser.add_argument("--stage", type=int, action="append",
                        help="run only this stage (repeatable); earlier stages come from checkpoints")
    parser.add_argument("--multi-worker", action="store_true",
                        help="tf.distribute.MultiWorkerMirroredStrategy configured by TF_CONFIG; the chief "
                             "writes to --out, worker i to --out/.worker_<i>")
    parser.add_argument("--parameter-servers", action="store_true",
                        help="tf.distribute.ParameterServerStrategy configured by TF_CONFIG (ps, worker and chief "
                             "tasks, the same command on every task): ps and worker tasks serve, the chief trains, "
                             "with embedding tables sharded row-wise over the ps tasks, and writes --out")
    parser.add_argument("--ps-min-shard-bytes", type=int, default=parameter_servers.DEFAULT_MIN_SHARD_BYTES,
                        help="with --parameter-servers: variables of at least this size are split into shards of "
                             "at least this size (default 256 KiB, TensorFlow's MinSizePartitioner default)")
    parser.add_argument("--ps-max-shards", type=int,
                        help="with --parameter-servers: at most this many shards per variable (default: one per "
                             "ps task)")
    parser.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs under <out>/tensorboard")
    extend = parser.add_argument_group("adding an objective to a trained run")
    extend.add_argument("--extend-from", metavar="RUN",
                        help="a finished run trained with --reserve-tau: train --add-objective as its next stage "
                             "on the capacity it reserved, into the new run --out (its training settings are "
                             "RUN's; the data flags must be RUN's; --reserve-tau reserves again)")
    extend.add_argument("--add-objective", metavar="NAME", help="the objective --extend-from adds (e.g. conversion)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if bool(args.extend_from) != bool(args.add_objective):
        parser.error("--extend-from and --add-objective go together")
    if args.extend_from and (args.multi_worker or args.parameter_servers or args.stage or args.train_tfrecords):
        parser.error("--extend-from trains in memory on one worker: without --multi-worker, --parameter-servers, "
                     "--stage or --train-tfrecords")
    if args.parameter_servers and (args.multi_worker or args.train_tfrecords):
        parser.error("--parameter-servers trains from in-memory rows with its own strategy: without --multi-worker "
                     "or --train-tfrecords")
    verbose = configure_output(args.verbose)
    strategy, out = None, Path(args.out)
    if args.parameter_servers:
        try:
            resolver = parameter_servers.cluster_resolver()
            if resolver.task_type in parameter_servers.SERVER_TASKS:
                parameter_servers.serve_task(resolver)  # a ps or worker task serves until it is stopped
                return
            strategy = parameter_servers.parameter_server_strategy(resolver, args.ps_min_shard_bytes,
                                                                   args.ps_max_shards)
        except ValueError as error:
            parser.error(f"--parameter-servers: {error}")
    if args.multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF work
        out = worker_out_dir(out, strategy.cluster_resolver)
    config = config_from_args(args)
    if args.train_tfrecords:
        if not args.holdout:
            parser.error("--train-tfrecords needs --holdout (the validation/test rows)")
        source = TFRecordSource(args.train_tfrecords, shuffle_buffer=args.shuffle_buffer)
        data = prepare_streaming(source, load_holdout(args.holdout), seed=args.data_seed)
    else:
        table = load_table(args)
        check_objectives(table, config.objectives, args)
        data = prepare(table, seed=args.data_seed, split=args.split)
        check_prepared(data, args)
    board = None if args.no_tensorboard else out / "tensorboard"
    if args.extend_from:
        try:
            run = extend_csmf(data, Path(args.extend_from), args.add_objective, out, reserve_tau=args.reserve_tau,
                              verbose=verbose, tensorboard_dir=board)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"--extend-from {args.extend_from}: {error}") from None
    else:
        run = train_csmf(data, config, out, args.stage, verbose=verbose, strategy=strategy, tensorboard_dir=board)
    if args.parameter_servers:
        path = parameter_servers.write_placement(run.model, out)
        sharded = sum(v["partitioned"] for v in json.loads(path.read_text()).values())
        print(f"{sharded} masked-layer variables sharded over the parameter servers (placement: {path})")
    results = run.results
    rows = {"CSMF (s_t)": results["stage"], **({"CSMF fused": results["fused"]} if "fused" in results else {})}
    print(format_results_table(rows, objectives=run.model.objectives))


if __name__ == "__main__":
    main()
