"""Prometheus metrics of the model server, exposed as TF Serving does (``--monitoring_config_file``).

TF Serving's ``MonitoringConfig`` text proto turns the endpoint on::

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

and the metrics are then served at ``path`` (default ``/monitoring/prometheus/metrics``) on the REST
port. Every server has its own ``prometheus_client.CollectorRegistry`` (:class:`ServingMetrics`), so
several servers in one process keep their own counts. The metrics are always collected (a counter
increment per request); the config only decides whether they are exposed.

| metric | type | labels |
|---|---|---|
| ``csmf_serving_requests_total`` | counter | model, version, signature, api (grpc/rest), method, code |
| ``csmf_serving_request_latency_seconds`` | histogram | model, api, method |
| ``csmf_serving_batch_size`` | histogram: rows per graph run of the batching queue | model, version |
| ``csmf_serving_batch_queue_wait_seconds`` | histogram: time a request waits in the queue before its batch runs | model, version |
| ``csmf_serving_batch_run_seconds`` | histogram: wall time of each graph run of the batching queue | model, version |
| ``csmf_serving_batch_queue_depth`` | gauge: requests waiting in the batching queue | model, version |
| ``csmf_serving_model_version_loaded`` | gauge: 1 per version being served | model, version |
| ``csmf_serving_model_load_failures_total`` | counter: versions refused (load or warm-up failed) | model |
| ``csmf_serving_model_unload_failures_total`` | counter: versions whose batcher did not stop | model |
| ``csmf_serving_config_reload_failures_total`` | counter: ``--model_config_file`` reloads refused | |

The two batching histograms split a request's time in the server (``request_latency``) into waiting for
a batch, the batch's graph run, and the rest (decoding, validation, encoding, the event loop): TF
Serving's ``batching_session`` queuing-latency metric is the analogue of the first.

``code`` is the API's own status: the gRPC status name (``OK``, ``NOT_FOUND``, ...) for gRPC, the HTTP
status (``200``, ``404``, ...) for REST. ``version`` and ``signature`` are those that answered (empty
for a request that failed before or while running); ``model`` is the requested model when it is
configured and ``""`` otherwise, so that clients sending random names cannot grow the label set.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, text_format
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from csmf_tf.serving.model_registry import ServedModels

#: TF Serving's default (PrometheusExporter::kPrometheusPath).
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _monitoring_config_class() -> type[message.Message]:
    """``tensorflow.serving.MonitoringConfig``.

    tensorflow-serving-api 2.20 on PyPI does not ship ``tensorflow_serving/config/monitoring_config_pb2``
    (only the model server build has it), so when the import fails the same two messages are built
    from their definition in TF Serving's ``monitoring_config.proto`` (package ``tensorflow.serving``,
    same field names and numbers) in a private descriptor pool, and ``text_format`` reads the same files.
    """
    try:
        from tensorflow_serving.config import monitoring_config_pb2
        return monitoring_config_pb2.MonitoringConfig
    except ImportError:
        pass
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tensorflow_serving/config/monitoring_config.proto",
                                               package="tensorflow.serving", syntax="proto3")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                         type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


MonitoringConfig = _monitoring_config_class()


class MonitoringConfigError(ValueError):
    """A monitoring config that cannot be used; the message names the file and the field."""


def read_monitoring_config(path: str | os.PathLike) -> str | None:
    """The Prometheus path a ``--monitoring_config_file`` enables, or ``None`` when it leaves it off."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MonitoringConfigError(f"{path}: cannot read the monitoring config file: {e}") from None
    config = MonitoringConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise MonitoringConfigError(f"{path}: not a tensorflow.serving.MonitoringConfig text proto: {e}") from None
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return None
    metrics_path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not metrics_path.startswith("/") or metrics_path.startswith("/v1/") or "?" in metrics_path:
        raise MonitoringConfigError(f"{path}: prometheus_config.path: {metrics_path!r} must be an absolute URL "
                                    "path outside /v1/ (the model API) without a query")
    return metrics_path


class _ServedState(Collector):
    """Gauges read at scrape time from what is served now (retired versions simply disappear)."""

    def __init__(self, models: "ServedModels") -> None:
        self._models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily("csmf_serving_model_version_loaded", "1 for each model version being served",
                                   labels=["model", "version"])
        depth = GaugeMetricFamily("csmf_serving_batch_queue_depth",
                                  "Requests waiting in a version's batching queue", labels=["model", "version"])
        for name, version, queued in self._models.snapshot():
            loaded.add_metric([name, str(version)], 1)
            if queued is not None:
                depth.add_metric([name, str(version)], queued)
        yield loaded
        yield depth


class ServingMetrics:
    """One server's metrics in its own registry (see module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("csmf_serving_requests", "Requests answered, by model, version, signature, API, "
                                "method and status code", ["model", "version", "signature", "api", "method", "code"],
                                registry=r)
        self.request_latency = Histogram("csmf_serving_request_latency_seconds", "Time from request to answer",
                                         ["model", "api", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("csmf_serving_batch_size", "Rows per graph run of the batching queue",
                                    ["model", "version"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_queue_wait = Histogram("csmf_serving_batch_queue_wait_seconds", "Time a request waits in the "
                                          "batching queue before its batch runs", ["model", "version"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.batch_run = Histogram("csmf_serving_batch_run_seconds", "Wall time of each graph run of the batching "
                                   "queue", ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.load_failures = Counter("csmf_serving_model_load_failures",
                                     "Versions refused because they failed to load or to warm up", ["model"],
                                     registry=r)
        self.unload_failures = Counter("csmf_serving_model_unload_failures",
                                       "Versions whose batching threads did not stop when unloaded", ["model"],
                                       registry=r)
        self.config_reload_failures = Counter("csmf_serving_config_reload_failures",
                                              "Model config file reloads refused (the previous config keeps serving)",
                                              registry=r)
        self._models: ServedModels | None = None
        self._request_children: dict[tuple, tuple] = {}

    def watch(self, models: "ServedModels") -> None:
        """Report ``models``' loaded versions and queue depths, and use their names as the ``model`` label."""
        self._models = models
        self.registry.register(_ServedState(models))

    def observe_request(self, api: str, method: str, model: str, version: int | None, signature: str, code: str,
                        seconds: float) -> None:
        """Count one answered request and its latency (label rules in the module docstring)."""
        if self._models is None or not self._models.configured(model):
            model = ""
        key = (model, version, signature, api, method, code)
        children = self._request_children.get(key)
        if children is None:   # labels() validates and locks on every call: look each label set up once
            children = self._request_children[key] = (
                self.requests.labels(model, "" if version is None else str(version), signature, api, method, code),
                self.request_latency.labels(model, api, method))
        children[0].inc()
        children[1].observe(seconds)

    def batching(self, model: str, version: int) -> "BatchMetrics":
        """What the batching queue of ``model``'s ``version`` reports into (its labelled histograms)."""
        return BatchMetrics(self, model, version)

    def exposition(self) -> tuple[bytes, str]:
        """``(body, content type)`` of a Prometheus scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class BatchMetrics:
    """One served version's batching histograms; :class:`csmf_tf.serving.batching.RetrievalBatcher` calls
    :meth:`ran` after every graph run and :meth:`waited` for every request a batch takes from the queue."""

    def __init__(self, metrics: ServingMetrics, model: str, version: int) -> None:
        labels = (model, str(version))
        self._size = metrics.batch_size.labels(*labels)
        self._run = metrics.batch_run.labels(*labels)
        self._wait = metrics.batch_queue_wait.labels(*labels)

    def ran(self, rows: int, seconds: float) -> None:
        self._size.observe(rows)
        self._run.observe(seconds)

    def waited(self, seconds: float) -> None:
        self._wait.observe(seconds)


__all__ = ["BatchMetrics", "DEFAULT_PROMETHEUS_PATH", "MonitoringConfig", "MonitoringConfigError", "ServingMetrics",
           "read_monitoring_config"]
