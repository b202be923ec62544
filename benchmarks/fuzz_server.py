"""Fuzz the model server over gRPC and REST: every request must get a status, none may crash the server.

    python benchmarks/fuzz_server.py                         # 10,000 requests, seed 0
    python benchmarks/fuzz_server.py --requests 500          # the short version the tests run
    python benchmarks/fuzz_server.py --model_base_path DIR   # fuzz a copy of model directory DIR, not a demo

The harness is :mod:`csmf_tf.testing.fuzz`; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository, for csmf_tf

from results_io import write_results  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from csmf_tf.testing import fuzz  # noqa: E402  (imports csmf_tf first: tf-keras before TensorFlow)
from csmf_tf.testing.fuzz.run import report, run_fuzz  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__ + "\n" + fuzz.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=int, help="replay only case I of this seed")
    p.add_argument("--concurrency", type=int, default=4, help="client threads (bad and good requests interleave)")
    p.add_argument("--rest_share", type=float, default=0.4)
    p.add_argument("--deadline_s", type=float, default=30.0, help="a request without a status by then fails")
    p.add_argument("--max_message_bytes", type=int, default=4 * 1024 * 1024, help="server flag")
    p.add_argument("--max_request_batch_size", type=int, default=256, help="server flag")
    p.add_argument("--min_mean_recall", type=float, default=0.8,
                   help="fail when valid answers hold fewer exact top-k items than this on average (the index "
                        "is approximate; random items would score about k / num_items)")
    p.add_argument("--model_base_path", help="fuzz a copy of this model directory (its version directories) "
                                             "instead of a new demo export")
    p.add_argument("--model_name", default="csmf")
    p.add_argument("--num_items", type=int, default=2000)
    p.add_argument("--num_users", type=int, default=200)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--workdir")
    p.add_argument("--out", default="results/fuzz_server.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz, print the summary, write JSON; exit status 0 only if it passed."""
    args = build_parser().parse_args(argv)
    results = run_fuzz(args, log=lambda s: print(s, flush=True))
    print(report(results), flush=True)
    write_results(results, args.out)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
