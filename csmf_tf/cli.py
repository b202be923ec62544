"""The ``csmf`` command: one entry point for the pipelines.

    csmf --help                 # the commands, one line each
    csmf main                   # = python -m pipelines.main
    csmf train --out runs/csmf  # = python -m pipelines.train_cascade --out runs/csmf
    csmf <command> --help       # a command's own arguments

Everything after the command is handed to that pipeline's ``main`` unchanged; ``python -m
pipelines.<module>`` keeps working the same.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

import csmf_tf

#: command -> (pipelines module, one line for ``csmf --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "main": ("pipelines.main", "the main job: popularity, two-tower and CSMF on one dataset, results table "
                               "and picture, TensorBoard logs, export and serving demo"),
    "train": ("pipelines.train_cascade", "train the CSMF cascade stage by stage (resumable; --stage, "
                                         "--train-tfrecords, --multi-worker)"),
    "experiments": ("pipelines.experiments", "baselines, ablations and sweeps over seeds, with a results report"),
    "tune-fusion": ("pipelines.tune_fusion", "choose the fusion weights on validation for a target (grid over "
                                             "the simplex) and make them the export's defaults"),
    "export": ("pipelines.export", "export trained towers (a run's bundle/) as a TF Serving SavedModel"),
    "serve": ("pipelines.serve", "serve exported models over TF Serving's gRPC and REST APIs"),
    "retrieve": ("pipelines.retrieve", "query a served model: a user's top-K with per-objective scores"),
    "generate-data": ("pipelines.generate_data", "write the synthetic exposure -> click -> conversion cascade "
                                                 "(CSV / TFRecord shards)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: csmf <command> [arguments ...]    (csmf <command> --help: the command's arguments)",
             "",
             f"CSMF multi-objective retrieval (csmf_tf {csmf_tf.__version__}): one two-tower trained in cascaded "
             "stages exposure -> click -> conversion.",
             "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Each command is also `python -m <module>` (pipelines.main, pipelines.train_cascade, ...)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"csmf_tf {csmf_tf.__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        from difflib import get_close_matches
        close = get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"csmf: unknown command {command!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "--verbose" in rest:
        csmf_tf.show_native_logs()  # before the pipeline imports TensorFlow
    module = importlib.import_module(COMMANDS[command][0])
    program = sys.argv[0]
    sys.argv[0] = f"csmf {command}"  # argparse's usage line names the command
    try:
        result = module.main(rest)
    finally:
        sys.argv[0] = program
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
