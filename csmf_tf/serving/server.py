"""A TF Serving-compatible model server for exported CSMF models (gRPC + REST, one process).

Stock ``tensorflow_model_server`` cannot be installed here and has no ScaNN ops, so this server speaks
TF Serving's own protocols instead: ``tensorflow.serving.PredictionService`` / ``ModelService`` over
gRPC and ``/v1/models/...`` over HTTP, so any TF Serving client works unchanged. See docs/serving.md.

    server = ModelServer("saved_models", "csmf", port=0, rest_api_port=0)
    grpc_port, rest_port = server.start()
    ...
    server.stop()
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Mapping

from csmf_tf.serving.batching import BatchingOptions
from csmf_tf.serving.core import Limits, PredictionCore
from csmf_tf.serving.grpc_service import GrpcServer
from csmf_tf.serving.model_registry import ModelRegistry
from csmf_tf.serving.rest import RestServer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Everything :class:`ModelServer` can be configured with (the CLI maps its flags onto this).

    ``port`` / ``rest_api_port``: 0 picks a free port (reported by :meth:`ModelServer.start`);
    ``rest_api_port=None`` disables REST. ``batching=None`` disables micro-batching.
    """

    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int | None = 8501
    poll_interval_s: float = 2.0
    num_versions: int = 1
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    batching: BatchingOptions | None = dataclasses.field(default_factory=BatchingOptions)
    limits: Limits = dataclasses.field(default_factory=Limits)
    grpc_max_workers: int = 32
    max_concurrent_rpcs: int | None = 256
    warmup: bool = True


class ModelServer:
    """gRPC + REST front ends over one :class:`ModelRegistry` (see module docstring)."""

    def __init__(self, model_base_path: str | os.PathLike, model_name: str,
                 options: ServerOptions | None = None, **overrides: object) -> None:
        options = options or ServerOptions()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        self.model_name = model_name
        self.registry = ModelRegistry(model_base_path, model_name, options.poll_interval_s,
                                      options.num_versions, options.version_labels, options.batching,
                                      options.warmup)
        self.core = PredictionCore(self.registry, options.limits)
        self._grpc: GrpcServer | None = None
        self._rest: RestServer | None = None
        self._rest_thread: threading.Thread | None = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._stopped = threading.Event()
        self._started = False

    def start(self) -> tuple[int, int | None]:
        """Load the highest servable version, open the ports; returns ``(grpc_port, rest_port)``.

        The server starts even when no version loads yet (requests then get NOT_FOUND), as TF
        Serving does; the poll thread picks up versions exported later.
        """
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        self.registry.start()
        o = self.options
        try:
            self._grpc = GrpcServer(self.core, o.host, o.port, o.grpc_max_workers, o.max_concurrent_rpcs)
            self.grpc_port = self._grpc.start()
            if o.rest_api_port is not None:
                self._rest = RestServer((o.host, o.rest_api_port), self.core)
                self.rest_port = self._rest.server_address[1]
                self._rest_thread = threading.Thread(target=self._rest.serve_forever, name="rest",
                                                     kwargs={"poll_interval": 0.1}, daemon=True)
                self._rest_thread.start()
        except BaseException:
            self.stop(grace_s=0)
            raise
        log.info("serving %s (versions %s): gRPC %s:%s, REST %s", self.model_name,
                 self.registry.served_versions(), o.host, self.grpc_port,
                 f"{o.host}:{self.rest_port}" if self.rest_port else "off")
        return self.grpc_port, self.rest_port

    @property
    def grpc_target(self) -> str:
        """``host:port`` for ``grpc.insecure_channel``."""
        return f"{self.options.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        """``http://host:port`` of the REST API."""
        return f"http://{self.options.host}:{self.rest_port}"

    def stop(self, grace_s: float = 10.0) -> None:
        """Graceful shutdown: refuse new requests, let in-flight ones finish (up to ``grace_s``), unload."""
        if self._stopped.is_set():
            return
        rest_drain = None
        if self._rest is not None:
            rest_drain = threading.Thread(target=self._rest.drain, name="rest-drain", daemon=True)
            rest_drain.start()
        if self._grpc is not None:
            self._grpc.stop(grace_s)
        if rest_drain is not None:
            rest_drain.join(grace_s + 1)
        self.registry.stop()
        self._stopped.set()
        log.info("server for %s stopped", self.model_name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished (or ``timeout``); True when stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ModelServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
