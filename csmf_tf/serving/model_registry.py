"""Loading, warming up, hot-swapping and retiring the versions of the served models.

A model's ``base_path`` (TF Serving's meaning: the model's own directory) holds its versions:
``<base_path>/<version>/`` directories with an integer name; anything else (``.tmp-*`` directories of
an export in progress, files) is ignored. :class:`ModelRegistry` serves the versions its
``model_version_policy`` asks for (:mod:`csmf_tf.serving.model_config`): ``latest { num_versions: N }``
the N highest versions that load and pass their warm-up, ``specific`` the listed ones that do,
``all`` every one that does. A poll thread rescans the directory: a new version is loaded and warmed
up *before* it replaces the old one; a version that fails to load or to warm up is refused (logged,
counted, reported by GetModelStatus) and the previous one keeps serving. A replaced version is
retired: requests already holding it finish on it (reference count), then its batcher stops and it
is dropped. :class:`ServedModels` holds one registry per configured model and applies a new model
config (models added, removed, re-pointed or given another policy or labels) while serving.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from csmf_tf.serving.batching import BatchingOptions, RetrievalBatcher
from csmf_tf.serving.constants import INIT_OP_SIGNATURE, MODEL_INFO_SIGNATURE, RETRIEVAL_SIGNATURE, WARMUP_FILE
from csmf_tf.serving.errors import ServingError, clean_tf_message, from_tf_error, not_found
from csmf_tf.serving.layout import version_dirs
from csmf_tf.serving.model_config import ModelConfig, ModelServerConfig, describe_policy, latest_count
from csmf_tf.serving.monitoring import ServingMetrics
from csmf_tf.serving.signatures import SignatureInfo
from csmf_tf.serving.validation import ModelInfo

try:  # Register the Scann>* custom ops before any SavedModel that uses them is loaded.
    from scann import scann_ops as _scann_ops  # noqa: F401
    HAVE_SCANN = True
except ImportError:  # brute-force exports still load without ScaNN
    HAVE_SCANN = False

log = logging.getLogger(__name__)


class LoadedModel:
    """One loaded, warmed-up version: its SavedModel, SignatureDefs, ``model_info`` and batcher."""

    def __init__(self, name: str, version: int, path: Path, batching: BatchingOptions | None,
                 metrics: ServingMetrics | None = None) -> None:
        self.name = name
        self.version = version
        self.path = path
        proto = saved_model_pb2.SavedModel()
        try:
            proto.ParseFromString((path / "saved_model.pb").read_bytes())
        except Exception as e:  # DecodeError for a truncated file, OSError for a missing one
            raise RuntimeError(f"cannot read {path / 'saved_model.pb'}: {e}") from e
        if not proto.meta_graphs:
            raise RuntimeError(f"{path / 'saved_model.pb'} has no MetaGraphDef")
        # Kept verbatim for GetModelMetadata (TF Serving reports the SignatureDefs as saved).
        self.signature_defs = dict(proto.meta_graphs[0].signature_def)
        self.signatures = {k: SignatureInfo.from_proto(k, v) for k, v in self.signature_defs.items()
                           if k != INIT_OP_SIGNATURE}
        self._saved = tf.saved_model.load(str(path))
        self._functions = {k: self._saved.signatures[k] for k in self.signatures}
        self.info = self._model_info()
        self._lock = threading.Lock()
        self._refs = 0
        self._retired = False
        self._closed = threading.Event()
        self._metrics = metrics
        self.batcher: RetrievalBatcher | None = None
        if batching is not None and RETRIEVAL_SIGNATURE in self.signatures:
            self.batcher = RetrievalBatcher(
                lambda inputs: self.run(RETRIEVAL_SIGNATURE, inputs), self.signatures[RETRIEVAL_SIGNATURE],
                batching, name=f"{name}-v{version}-batcher",
                observer=metrics.batching(name, version) if metrics is not None else None)

    def _model_info(self) -> ModelInfo | None:
        """What a CSMF export says about itself (objectives, ``k_max``); ``None`` for other SavedModels,
        whose ``k`` and weights are then checked without bounds (:mod:`csmf_tf.serving.validation`)."""
        sig = self.signatures.get(MODEL_INFO_SIGNATURE)
        if sig is None or sig.inputs or not {"objectives", "k_max"} <= set(sig.outputs):
            return None
        return ModelInfo.from_outputs(self.run(MODEL_INFO_SIGNATURE, {}))

    # -- execution -----------------------------------------------------------------------------------
    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call a signature on complete, validated inputs; numpy in, numpy out."""
        sig = self.signatures[signature_name]
        feed = {k: tf.constant(v, dtype=sig.inputs[k].dtype) for k, v in inputs.items()}
        outputs = self._functions[signature_name](**feed)
        return {k: v.numpy() for k, v in outputs.items()}

    def warm_up(self, max_records: int = 100) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (as TF Serving does); returns the count.

        Without a warm-up file, every signature whose inputs all have defaults or simple shapes is
        called once with placeholder inputs so that a broken graph is caught before it serves.
        """
        from tensorflow_serving.apis import prediction_log_pb2

        warmup = self.path / WARMUP_FILE
        count = 0
        if warmup.is_file():
            for raw in tf.data.TFRecordDataset(str(warmup)).take(max_records):
                record = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
                if not record.HasField("predict_log"):
                    continue
                request = record.predict_log.request
                name = request.model_spec.signature_name or RETRIEVAL_SIGNATURE
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                for k, v in self.signatures[name].defaults.items():
                    inputs.setdefault(k, v)
                self.run(name, inputs)
                count += 1
            return count
        for name, sig in self.signatures.items():
            inputs = {}
            for k, spec in sig.inputs.items():
                if k in sig.defaults:
                    inputs[k] = sig.defaults[k]
                elif spec.shape is not None and all(d is not None for d in spec.shape[1:]):
                    shape = [1, *spec.shape[1:]] if spec.batched else list(spec.shape)
                    inputs[k] = np.zeros(shape, spec.numpy_dtype) if spec.dtype != tf.string \
                        else np.full(shape, b"", dtype=object)
                else:
                    break
            else:
                self.run(name, inputs)
                count += 1
        return count

    # -- lifetime ------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """One more request holds this version."""
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        """A request is done with this version; the last one out closes a retired version."""
        with self._lock:
            self._refs -= 1
            done = self._retired and self._refs == 0
        if done:
            self._close()

    def retire(self) -> None:
        """No new requests will get this version; close it once the last in-flight one finishes."""
        with self._lock:
            self._retired = True
            done = self._refs == 0
        if done:
            self._close()

    def _close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.batcher is not None and not self.batcher.stop():
            log.error("unloading %s version %d: its batching threads did not stop", self.name, self.version)
            if self._metrics is not None:
                self._metrics.unload_failures.labels(self.name).inc()
            return
        log.info("unloaded %s version %d", self.name, self.version)

    @property
    def in_flight(self) -> int:
        """Requests currently holding this version."""
        with self._lock:
            return self._refs

    @property
    def closed(self) -> bool:
        """True once retired and drained."""
        return self._closed.is_set()


@dataclasses.dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    version: int
    state: str                 # START | LOADING | AVAILABLE | UNLOADING | END (TF Serving's names)
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


def _fingerprint(path: Path) -> tuple:
    """Changes when anything in a version directory changes, so a refused version is retried after a fix.

    Every file counts (name, size, mtime): a truncated ``variables/variables.data-*`` replaced by a good
    copy changes neither ``saved_model.pb`` nor the version directory's own mtime. Only refused versions
    are fingerprinted on each poll, and a version holds a handful of files.
    """
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:            # vanished while we looked: the next poll sees the new state
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    try:
        own = path.stat().st_mtime_ns
    except OSError:
        own = None
    return (own, tuple(entries))


class ModelRegistry:
    """The versions of one model, from its ``ModelConfig`` (checked by :mod:`csmf_tf.serving.model_config`)."""

    def __init__(self, config: ModelConfig, poll_interval_s: float = 2.0, batching: BatchingOptions | None = None,
                 warmup: bool = True, metrics: ServingMetrics | None = None) -> None:
        self.model_name = config.name
        self.model_dir = Path(config.base_path)
        self._config = ModelConfig()
        self._config.CopyFrom(config)
        self.poll_interval_s = poll_interval_s
        self.batching = batching
        self.warmup = warmup
        self.metrics = metrics
        if metrics is not None:   # the model's failure counters exist (at 0) from the start, for alerts
            metrics.load_failures.labels(self.model_name)
            metrics.unload_failures.labels(self.model_name)
        self._lock = threading.Lock()
        self._served: dict[int, LoadedModel] = {}
        self._states: dict[int, VersionState] = {}
        self._refused: dict[int, tuple] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    @property
    def version_labels(self) -> dict[str, int]:
        """``version_labels`` of the model's config."""
        return dict(self._config.version_labels)

    def describe_policy(self) -> str:
        """The version policy in a few words."""
        return describe_policy(self._config)

    def reconfigure(self, config: ModelConfig) -> None:
        """Take a new version policy and labels for the same model directory, and apply them now."""
        if config.name != self.model_name or not _same_dir(config.base_path, self.model_dir):
            raise ValueError(f"reconfigure keeps the model and its directory ({self.model_name}, {self.model_dir})")
        new = ModelConfig()
        new.CopyFrom(config)
        with self._poll_lock:
            self._config = new
        self.poll_once()

    # -- discovery / loading -------------------------------------------------------------------------
    def _on_disk(self) -> dict[int, Path]:
        # Shared with the exporter: ASCII decimal names within int64 only, so an odd directory name
        # (``²``, a 30-digit number) is ignored instead of breaking every poll.
        return version_dirs(self.model_dir)

    def _load(self, version: int, path: Path) -> LoadedModel | None:
        # Fingerprint what is about to be loaded, not what is there after a failure: if a copier is
        # still writing the directory, the files change during the load and the next poll retries.
        fingerprint = _fingerprint(path)
        with self._lock:
            self._states[version] = VersionState(version, "LOADING")
        t0 = time.perf_counter()
        model = None
        try:
            model = LoadedModel(self.model_name, version, path, self.batching, self.metrics)
            n = model.warm_up() if self.warmup else 0
        except Exception as e:  # noqa: BLE001 - a broken version must never take the server down
            message = (clean_tf_message(e.message) if isinstance(e, tf.errors.OpError) else str(e)).strip()
            text = message.splitlines()[0] if message else type(e).__name__
            log.error("refusing %s version %d (%s): %s", self.model_name, version, path, text)
            if self.metrics is not None:
                self.metrics.load_failures.labels(self.model_name).inc()
            if model is not None:
                model.retire()
            with self._lock:
                self._refused[version] = fingerprint
                self._states[version] = VersionState(version, "END", grpc.StatusCode.UNKNOWN,
                                                     f"failed to load or warm up: {text}")
            return None
        log.info("loaded %s version %d in %.2fs (%d warm-up requests)", self.model_name, version,
                 time.perf_counter() - t0, n)
        return model

    def poll_once(self) -> None:
        """Rescan the model directory and load / retire versions by the version policy (thread-safe)."""
        with self._poll_lock:
            disk = self._on_disk()
            for v in [v for v, fp in self._refused.items() if v not in disk or _fingerprint(disk[v]) != fp]:
                del self._refused[v]      # rewritten or removed: forget the refusal
            candidates = sorted((v for v in disk if v not in self._refused), reverse=True)
            policy = self._config.model_version_policy
            choice = policy.WhichOneof("policy_choice")
            if choice == "specific":
                candidates = [v for v in candidates if v in set(policy.specific.versions)]
            # latest N: the N highest that load (a refused one gives way to the next); all / specific: each
            limit = len(candidates) if choice in ("all", "specific") else latest_count(self._config)
            wanted: list[int] = []
            for v in candidates:
                if len(wanted) >= limit:
                    break
                if v in self._served:
                    wanted.append(v)
                    continue
                model = self._load(v, disk[v])
                if model is None:
                    continue
                with self._lock:
                    self._served[v] = model
                    self._states[v] = VersionState(v, "AVAILABLE")
                wanted.append(v)
            keep = set(wanted)
            with self._lock:
                retired = [self._served.pop(v) for v in list(self._served) if v not in keep]
                for m in retired:
                    self._states[m.version] = VersionState(m.version, "END")
            for m in retired:
                log.info("retiring %s version %d (%d in flight)", self.model_name, m.version, m.in_flight)
                m.retire()

    def start(self) -> None:
        """Load what is on disk now (synchronously), then keep polling in a background thread."""
        self.poll_once()
        if self.poll_interval_s > 0:
            self._thread = threading.Thread(target=self._poll_loop, name=f"{self.model_name}-poll",
                                            daemon=True)
            self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling whatever the file system does
                log.exception("polling %s failed", self.model_dir)

    def stop(self) -> None:
        """Stop polling and retire every version (their batchers drain first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            served = list(self._served.values())
            self._served.clear()
        for m in served:
            m.retire()

    # -- lookup --------------------------------------------------------------------------------------
    def _pick_locked(self, version: int | None, label: str | None) -> LoadedModel:
        if label:
            labels = self._config.version_labels
            if label not in labels:
                raise not_found(f"unrecognized servable version label: {label}")
            version = labels[label]
        if version is None:
            if not self._served:
                raise not_found(f"Servable not found for request: Latest({self.model_name})")
            version = max(self._served)
        model = self._served.get(version)
        if model is None:
            raise not_found(f"Servable not found for request: Specific({self.model_name}, {version})")
        return model

    def resolve_version(self, version: int | None = None, label: str | None = None) -> int:
        """The concrete version a request means (NOT_FOUND when it is not being served)."""
        with self._lock:
            return self._pick_locked(version, label).version

    @contextlib.contextmanager
    def acquire(self, version: int | None = None, label: str | None = None) -> Iterator[LoadedModel]:
        """Hold a served version for the duration of one request (it will not be closed meanwhile)."""
        with self._lock:
            model = self._pick_locked(version, label)
            model.acquire()
        try:
            yield model
        finally:
            model.release()

    def served_versions(self) -> list[int]:
        """Versions currently serving, ascending."""
        with self._lock:
            return sorted(self._served)

    def version_states(self, version: int | None = None) -> list[VersionState]:
        """GetModelStatus' view: every version seen, or one (NOT_FOUND if never seen)."""
        with self._lock:
            if version is not None:
                if version not in self._states:
                    raise not_found(f"Could not find version {version} of model {self.model_name}")
                return [dataclasses.replace(self._states[version])]
            if not self._states:
                raise not_found(f"Could not find any versions of model {self.model_name}")
            return [dataclasses.replace(s) for _, s in sorted(self._states.items(), reverse=True)]

    def queue_depths(self) -> dict[int, int | None]:
        """``{version: requests waiting in its batching queue}`` of the served versions (None: no batcher)."""
        with self._lock:
            served = list(self._served.values())
        return {m.version: (m.batcher.queue_depth if m.batcher is not None else None) for m in served}


def _same_dir(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class ServedModels:
    """Every served model by name, one :class:`ModelRegistry` each, as a ``ModelServerConfig`` says.

    :meth:`apply` makes the served set match a (checked) config while requests keep flowing: a new
    model is loaded before it becomes visible; a model whose ``base_path`` changed gets a new registry,
    loaded before it replaces the old one; a model whose policy or labels changed is reconfigured in
    place (new versions load before old ones retire); a model no longer configured is retired (its
    in-flight requests finish first).
    """

    def __init__(self, poll_interval_s: float = 2.0, batching: BatchingOptions | None = None, warmup: bool = True,
                 metrics: ServingMetrics | None = None) -> None:
        self.poll_interval_s = poll_interval_s
        self.batching = batching
        self.warmup = warmup
        self.metrics = metrics
        self._registries: dict[str, ModelRegistry] = {}
        self._lock = threading.Lock()         # guards the dict: lookups never wait for a load
        self._apply_lock = threading.Lock()   # one apply at a time (start-up, reloads, stop)
        self._stopped = False

    def apply(self, config: ModelServerConfig) -> None:
        """Serve exactly the models of ``config`` (see class docstring); versions that fail to load are
        refused one by one (GetModelStatus, logs), never the whole config."""
        with self._apply_lock:
            if self._stopped:
                raise RuntimeError("the served models were stopped")
            wanted = {m.name: m for m in config.model_config_list.config}
            with self._lock:
                current = dict(self._registries)
            for name, model in wanted.items():
                old = current.get(name)
                if old is not None and _same_dir(old.model_dir, model.base_path):
                    old.reconfigure(model)
                    continue
                registry = ModelRegistry(model, self.poll_interval_s, self.batching, self.warmup, self.metrics)
                registry.start()
                with self._lock:
                    self._registries[name] = registry
                if old is not None:
                    log.info("model %s moved from %s to %s", name, old.model_dir, registry.model_dir)
                    old.stop()
            for name in sorted(set(current) - set(wanted)):
                with self._lock:
                    registry = self._registries.pop(name)
                log.info("model %s is no longer configured: unloading it", name)
                registry.stop()
            log.info("serving %s", self.describe())

    def registry(self, model_name: str) -> ModelRegistry:
        """The registry of a served model; NOT_FOUND (TF Serving's wording) for any other name."""
        with self._lock:
            registry = self._registries.get(model_name)
        if registry is None:
            raise not_found(f"Servable not found for request: Latest({model_name}) (model {model_name!r} is not "
                            "served)")
        return registry

    def configured(self, model_name: str) -> bool:
        """True when ``model_name`` is a served model (whether or not a version is loaded yet)."""
        with self._lock:
            return model_name in self._registries

    def names(self) -> list[str]:
        """Served model names, sorted."""
        with self._lock:
            return sorted(self._registries)

    def served_versions(self) -> dict[str, list[int]]:
        """``{model: versions serving}``."""
        with self._lock:
            registries = dict(self._registries)
        return {name: registries[name].served_versions() for name in sorted(registries)}

    def describe(self) -> str:
        """``"a versions [1, 3] (policy: ...); b versions [2] (...)"`` for logs and the start-up line."""
        with self._lock:
            registries = dict(self._registries)
        return "; ".join(f"{name} versions {r.served_versions()} ({r.describe_policy()})"
                         for name, r in sorted(registries.items())) or "no model"

    def snapshot(self) -> list[tuple[str, int, int | None]]:
        """``(model, version, queue depth or None)`` of every served version (for the metrics)."""
        with self._lock:
            registries = dict(self._registries)
        return [(name, version, depth) for name, r in sorted(registries.items())
                for version, depth in sorted(r.queue_depths().items())]

    def stop(self) -> None:
        """Retire every model (in-flight requests finish first); no :meth:`apply` after this."""
        with self._apply_lock:
            self._stopped = True
            with self._lock:
                registries = list(self._registries.values())
                self._registries.clear()
        for registry in registries:
            registry.stop()


def run_or_raise(model: LoadedModel, signature_name: str, inputs: Mapping[str, np.ndarray]) -> dict:
    """``model.run`` with TF runtime errors mapped to their serving status."""
    try:
        return model.run(signature_name, inputs)
    except tf.errors.OpError as e:
        raise from_tf_error(e) from None
    except (TypeError, ValueError) as e:   # binding / conversion problems are the request's fault
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
