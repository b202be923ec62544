"""A TF Serving-compatible model server for exported CSMF models (gRPC + REST, one process).

Stock ``tensorflow_model_server`` cannot be installed here and has no ScaNN ops, so this server speaks
TF Serving's own protocols instead: ``tensorflow.serving.PredictionService`` / ``ModelService`` over
gRPC and ``/v1/models/...`` over HTTP, so any TF Serving client works unchanged, and takes TF
Serving's configuration: one model (``model_base_path`` is the model's own directory, holding its
version subdirectories) or a ``--model_config_file`` with several, reloaded while serving; Prometheus
metrics on the REST port with a ``--monitoring_config_file``. See docs/serving.md.

    server = ModelServer("saved_models/csmf", "csmf", port=0, rest_api_port=0)
    grpc_port, rest_port = server.start()
    ...
    server.stop()

    server = ModelServer(model_config_file="models.config", model_config_file_poll_wait_s=30,
                         monitoring_config_file="monitoring.config", port=0, rest_api_port=0)
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Mapping

from csmf_tf.serving.batching import BatchingOptions
from csmf_tf.serving.core import Limits, PredictionCore
from csmf_tf.serving.grpc_service import GrpcServer
from csmf_tf.serving.model_config import (ModelConfigError, ModelServerConfig, check_model_config,
                                          parse_model_config, single_model_config)
from csmf_tf.serving.model_registry import ServedModels
from csmf_tf.serving.monitoring import ServingMetrics, read_monitoring_config
from csmf_tf.serving.rest import RestServer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Everything :class:`ModelServer` can be configured with (the CLI maps its flags onto this).

    ``port`` / ``rest_api_port``: 0 picks a free port (reported by :meth:`ModelServer.start`);
    ``rest_api_port=None`` disables REST. ``batching=None`` disables micro-batching.
    ``num_versions`` / ``version_labels`` apply to the single-model form only (a config file gives each
    model its own policy and labels). ``model_config_file_poll_wait_s``: how often the config file is
    re-read (0: never, as in TF Serving). ``monitoring_config_file``: TF Serving's ``MonitoringConfig``,
    whose Prometheus endpoint is served on the REST port.
    """

    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int | None = 8501
    poll_interval_s: float = 2.0
    num_versions: int = 1
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)
    model_config_file: str | os.PathLike | None = None
    model_config_file_poll_wait_s: float = 0.0
    monitoring_config_file: str | os.PathLike | None = None
    batching: BatchingOptions | None = dataclasses.field(default_factory=BatchingOptions)
    limits: Limits = dataclasses.field(default_factory=Limits)
    grpc_max_workers: int = 32
    max_concurrent_rpcs: int | None = 256
    warmup: bool = True


class ModelServer:
    """gRPC + REST front ends over the served models (see module docstring).

    The model configuration (and the monitoring configuration) is read and checked here, before
    anything loads: a bad one raises :class:`ModelConfigError` (or ``MonitoringConfigError``) naming the
    file or flag and the field.
    """

    def __init__(self, model_base_path: str | os.PathLike | None = None, model_name: str | None = None,
                 options: ServerOptions | None = None, **overrides: object) -> None:
        options = options or ServerOptions()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        self.options = options
        self._config_text: str | None = None
        if options.model_config_file is not None:
            if model_base_path is not None or model_name is not None:
                raise ModelConfigError("--model_config_file and --model_name/--model_base_path are mutually "
                                       "exclusive: name the models in the config file")
            self._config_text = self._read_config_text()
            config = parse_model_config(self._config_text, str(options.model_config_file))
        else:
            if model_base_path is None or not model_name:
                raise ModelConfigError("either --model_config_file or --model_name with --model_base_path (the "
                                       "model's directory, holding its version subdirectories) is required")
            if options.num_versions < 1:
                raise ModelConfigError(f"flags: --num_versions: must be >= 1, got {options.num_versions}")
            config = single_model_config(model_name, model_base_path, options.num_versions, options.version_labels)
            check_model_config(config, "flags")
        self._initial_config: ModelServerConfig = config
        self.metrics_path = (read_monitoring_config(options.monitoring_config_file)
                             if options.monitoring_config_file is not None else None)
        if self.metrics_path is not None and options.rest_api_port is None:
            raise ModelConfigError(f"{options.monitoring_config_file}: prometheus_config.enable: the metrics are "
                                   "served on the REST port, which is off (--rest_api_port)")
        self.metrics = ServingMetrics()
        self.models = ServedModels(options.poll_interval_s, options.batching, options.warmup, self.metrics)
        self.metrics.watch(self.models)
        self.core = PredictionCore(self.models, options.limits)
        self._grpc: GrpcServer | None = None
        self._rest: RestServer | None = None
        self._rest_thread: threading.Thread | None = None
        self._config_thread: threading.Thread | None = None
        self._last_refusal: str | None = None
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._started = False

    def _read_config_text(self) -> str:
        path = self.options.model_config_file
        try:
            return Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{path}: cannot read the model config file: {e}") from None

    def start(self) -> tuple[int, int | None]:
        """Load the configured models' versions, open the ports; returns ``(grpc_port, rest_port)``.

        The server starts even when a model has no loadable version yet (its requests then get
        NOT_FOUND), as TF Serving does; the poll threads pick up versions exported later.
        """
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        o = self.options
        try:
            self.models.apply(self._initial_config)
            self._grpc = GrpcServer(self.core, o.host, o.port, o.grpc_max_workers, o.max_concurrent_rpcs,
                                    self.metrics)
            self.grpc_port = self._grpc.start()
            if o.rest_api_port is not None:
                self._rest = RestServer((o.host, o.rest_api_port), self.core, self.metrics, self.metrics_path)
                self.rest_port = self._rest.server_address[1]
                self._rest_thread = threading.Thread(target=self._rest.serve_forever, name="rest",
                                                     kwargs={"poll_interval": 0.1}, daemon=True)
                self._rest_thread.start()
        except BaseException:
            self.stop(grace_s=0)
            raise
        if o.model_config_file is not None and o.model_config_file_poll_wait_s > 0:
            self._config_thread = threading.Thread(target=self._watch_config, name="model-config-poll", daemon=True)
            self._config_thread.start()
        log.info("serving %s: gRPC %s:%s, REST %s%s", self.models.describe(), o.host, self.grpc_port,
                 f"{o.host}:{self.rest_port}" if self.rest_port else "off",
                 f", Prometheus metrics at {self.metrics_path}" if self.metrics_path else "")
        return self.grpc_port, self.rest_port

    def reload_config(self) -> bool:
        """Re-read ``--model_config_file`` and apply it if it changed; True when a new config was applied.

        A config that does not read or check is refused: the error is logged (once per distinct
        error) and counted, and the models already served keep serving. An unchanged file is a no-op.
        """
        path = self.options.model_config_file
        if path is None:
            raise RuntimeError("this server was not started from a model config file")
        try:
            text = self._read_config_text()
            if text == self._config_text:
                return False
            config = parse_model_config(text, str(path))
        except ModelConfigError as e:
            if str(e) != self._last_refusal:
                self._last_refusal = str(e)
                self.metrics.config_reload_failures.inc()
                log.error("refusing the new model config; the served models keep serving: %s", e)
            return False
        self._last_refusal = None
        log.info("model config %s changed: applying it", path)
        self.models.apply(config)
        self._config_text = text
        return True

    def _watch_config(self) -> None:
        while not self._stopping.wait(self.options.model_config_file_poll_wait_s):
            try:
                self.reload_config()
            except Exception:  # noqa: BLE001 - keep watching whatever happens to one reload
                log.exception("reloading %s failed", self.options.model_config_file)

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
        self._stopping.set()
        if self._config_thread is not None:
            self._config_thread.join(timeout=60)
        rest_drain = None
        if self._rest is not None:
            rest_drain = threading.Thread(target=self._rest.drain, name="rest-drain", daemon=True)
            rest_drain.start()
        if self._grpc is not None:
            self._grpc.stop(grace_s)
        if rest_drain is not None:
            rest_drain.join(grace_s + 1)
        self.models.stop()
        self._stopped.set()
        log.info("server stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished (or ``timeout``); True when stopped."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ModelServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
