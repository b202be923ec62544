"""Serve exported CSMF models with TF Serving's gRPC and REST APIs, configured as tensorflow_model_server is.

    python -m pipelines.serve --model_name csmf --model_base_path saved_models/csmf --port 8500 --rest_api_port 8501
    python -m pipelines.serve --model_config_file models.config --model_config_file_poll_wait_seconds 30 \
        --monitoring_config_file monitoring.config

--model_base_path is the model's own directory, holding its version subdirectories (as in TF Serving);
--model_config_file is TF Serving's ModelServerConfig text proto (several models, each with its own
base_path, model_version_policy and version_labels), re-read every --model_config_file_poll_wait_seconds
(0: never); --monitoring_config_file is TF Serving's MonitoringConfig (Prometheus metrics on the REST
port). New versions are picked up as they are exported (hot swap, no failed requests), broken ones
refused. A bad config stops the start-up with one line naming the file (or flag) and the field.
SIGTERM / Ctrl-C: stop accepting, finish in-flight requests, exit 0. Use --port 0 / --rest_api_port 0
for free ports (reported on stdout and in --port_file).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

import csmf_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (TF Serving's names where it has one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", help="name of the single served model (default: csmf; not with "
                                        "--model_config_file)")
    p.add_argument("--model_base_path", help="the model's directory, holding its version subdirectories "
                                             "(e.g. saved_models/csmf; not with --model_config_file)")
    p.add_argument("--model_config_file", help="TF Serving ModelServerConfig text proto: several models, each with "
                                               "base_path, model_version_policy and version_labels")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                   help="how often to re-read --model_config_file (0: never)")
    p.add_argument("--monitoring_config_file", help="TF Serving MonitoringConfig text proto; prometheus_config "
                                                    "serves Prometheus metrics on the REST port")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: any free port, -1: off)")
    p.add_argument("--port_file", help="write {\"grpc_port\": .., \"rest_port\": ..} here once serving")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=2.0,
                   help="how often to look for new versions (0: never)")
    p.add_argument("--num_versions", type=int, default=1,
                   help="single-model form: serve the N highest versions (a config file sets model_version_policy)")
    p.add_argument("--version_label", action="append", default=[], metavar="LABEL=VERSION",
                   help="single-model form: a version label (a config file sets version_labels)")
    p.add_argument("--enable_batching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max_batch_size", type=int, default=64)
    p.add_argument("--batch_timeout_micros", type=int, default=2000)
    p.add_argument("--max_enqueued_requests", type=int, default=1024,
                   help="requests waiting for a batch beyond which requests get UNAVAILABLE")
    p.add_argument("--num_batch_threads", type=int, default=1)
    p.add_argument("--max_request_batch_size", type=int, default=1024)
    p.add_argument("--max_message_bytes", type=int, default=16 * 1024 * 1024)
    p.add_argument("--request_timeout_s", type=float, default=30.0)
    p.add_argument("--grpc_max_workers", type=int, default=32,
                   help="threads for signatures that are not micro-batched (gRPC requests themselves are "
                        "coroutines on one event loop)")
    p.add_argument("--grpc_max_concurrent_rpcs", type=int, default=256,
                   help="RPCs admitted at once; beyond, clients get RESOURCE_EXHAUSTED")
    p.add_argument("--grace_s", type=float, default=10.0, help="drain time on shutdown")
    p.add_argument("--log_level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from csmf_tf.serving.batching import BatchingOptions
    from csmf_tf.serving.core import Limits
    from csmf_tf.serving.layout import parse_version
    from csmf_tf.serving.model_config import ModelConfigError
    from csmf_tf.serving.monitoring import MonitoringConfigError
    from csmf_tf.serving.server import ModelServer, ServerOptions

    labels = {}
    for item in args.version_label:
        name, _, version = item.partition("=")
        number = parse_version(version)
        if not name or number is None:
            raise SystemExit(f"--version_label expects LABEL=VERSION (VERSION in ASCII digits), got {item!r}")
        labels[name] = number
    batching = BatchingOptions(args.max_batch_size, args.batch_timeout_micros / 1e6, args.max_enqueued_requests,
                               args.num_batch_threads) if args.enable_batching else None
    options = ServerOptions(
        host=args.host, port=args.port, rest_api_port=None if args.rest_api_port < 0 else args.rest_api_port,
        poll_interval_s=args.file_system_poll_wait_seconds, num_versions=args.num_versions,
        version_labels=labels, model_config_file=args.model_config_file,
        model_config_file_poll_wait_s=args.model_config_file_poll_wait_seconds,
        monitoring_config_file=args.monitoring_config_file, batching=batching,
        limits=Limits(args.max_request_batch_size, args.max_message_bytes, args.request_timeout_s),
        grpc_max_workers=args.grpc_max_workers, max_concurrent_rpcs=args.grpc_max_concurrent_rpcs)
    # The single-model form names its model csmf by default; with a config file any name is an error.
    model_name = args.model_name or ("csmf" if args.model_config_file is None else None)
    try:
        server = ModelServer(args.model_base_path, model_name, options)
    except (ModelConfigError, MonitoringConfigError) as e:
        raise SystemExit(f"serve: error: {str(e).replace(chr(10), ' ')}") from None   # one line
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("serve").info("received %s: draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    grpc_port, rest_port = server.start()
    rest = f"{args.host}:{rest_port}" if rest_port is not None else "off"
    print(f"serving {server.models.describe()}: gRPC {args.host}:{grpc_port} REST {rest}"
          + (f" metrics {server.metrics_path}" if server.metrics_path else ""), flush=True)
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"grpc_port": grpc_port, "rest_port": rest_port, "pid": os.getpid()}, f)
        os.replace(tmp, args.port_file)   # readers never see a half-written file
    while not stop.wait(0.5):
        pass
    server.stop(grace_s=args.grace_s)
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
