"""Host-side request validation: one function, :func:`validate_request`, for both front ends.

A request is checked against the SignatureDef (names, dtypes, shapes, one batch size, the server's row
limit) and, on the retrieval signature, against the model's own ``model_info`` (:class:`ModelInfo`):
``k`` a scalar with ``1 <= k <= k_max``, ``objective_weights`` of shape ``[S]`` or ``[B, S]`` (``B``
rows or one) and finite. The graph asserts the same retrieval rules, so stock TF Serving refuses such
requests too; checking them here first lets a bad request fail alone instead of failing the
micro-batch it would have joined (:mod:`csmf_tf.serving.batching`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import grpc
import numpy as np

from csmf_tf.serving.constants import K_INPUT, RETRIEVAL_SIGNATURE, WEIGHTS_INPUT
from csmf_tf.serving.errors import ServingError, invalid
from csmf_tf.serving.signatures import SignatureInfo


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a CSMF export's ``model_info`` signature says about it (the one source of ``S`` and ``k_max``)."""

    objectives: tuple[str, ...]
    k_max: int

    @property
    def num_objectives(self) -> int:
        """``S``, the length of ``objective_weights``."""
        return len(self.objectives)

    @staticmethod
    def from_outputs(outputs: Mapping[str, np.ndarray]) -> "ModelInfo":
        """From the numpy outputs of a ``model_info`` call."""
        return ModelInfo(tuple(x.decode() if isinstance(x, bytes) else str(x) for x in outputs["objectives"]),
                         int(outputs["k_max"]))


def validate_request(sig: SignatureInfo, inputs: Mapping[str, np.ndarray], max_batch_size: int | None = None,
                     info: ModelInfo | None = None) -> tuple[dict[str, np.ndarray], int | None]:
    """Check a request (see module docstring) and fill in the signature's defaults.

    Returns ``(inputs with defaults, batch size or None)``. Raises INVALID_ARGUMENT for unknown or
    missing inputs, wrong dtype or shape, inconsistent batch sizes and, on the retrieval signature, a
    bad ``k`` or bad weights (bounds from ``info``, the served model's); RESOURCE_EXHAUSTED above
    ``max_batch_size`` rows.
    """
    out, batch = _check_signature(sig, inputs)
    if max_batch_size is not None and batch is not None and batch > max_batch_size:
        raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request batch size {batch} exceeds the server's limit of {max_batch_size}")
    if sig.name == RETRIEVAL_SIGNATURE:
        _check_retrieval(inputs, batch, info)
    return out, batch


def _check_signature(sig: SignatureInfo, inputs: Mapping[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], int | None]:
    if not inputs.keys() <= sig.inputs.keys():
        raise invalid(f"input(s) {sorted(set(inputs) - set(sig.inputs))} not in signature {sig.name!r}; "
                      f"expected {sorted(sig.inputs)}")
    missing = [k for k in sig.required if k not in inputs]
    if missing:
        raise invalid(f"missing input(s) {missing} for signature {sig.name!r} (required: "
                      f"{sig.required_inputs()}, optional: {sorted(sig.defaults)})")
    out: dict[str, np.ndarray] = {}
    batch: int | None = None
    batch_of: str | None = None
    for name, spec in sig.inputs.items():
        value = inputs.get(name)
        if value is None:
            out[name] = sig.defaults[name]
            continue
        value = np.asarray(value)
        want = spec.numpy_dtype
        if want == object:
            if value.dtype != object and value.dtype.kind not in ("S", "U"):
                raise invalid(f"input {name!r}: expects dtype string but got {value.dtype}")
        elif value.dtype != want:
            raise invalid(f"input {name!r}: expects dtype {spec.dtype.name} but got {value.dtype}")
        if not spec.matches(value.shape):
            raise invalid(f"input {name!r}: expects shape {spec.describe()} but got {list(value.shape)}")
        if spec.batched:
            if batch is None:
                batch, batch_of = value.shape[0], name
            elif value.shape[0] != batch:
                raise invalid(f"inputs {batch_of!r} and {name!r} have different batch sizes "
                              f"({batch} vs {value.shape[0]})")
        out[name] = value
    return out, batch


def _check_retrieval(inputs: Mapping[str, np.ndarray], rows: int | None, info: ModelInfo | None) -> None:
    """``k`` and ``objective_weights`` as the request gave them (omitted ones are the export's defaults).

    Without ``info`` (a SavedModel that does not describe itself) only the bounds are left unchecked.
    """
    k_max = info.k_max if info is not None else None
    s = info.num_objectives if info is not None else None
    if K_INPUT in inputs:
        k = np.asarray(inputs[K_INPUT])
        if k.ndim != 0:
            raise invalid(f"{K_INPUT} must be a scalar, got shape {list(k.shape)}")
        k = int(k)
        if k < 1 or (k_max is not None and k > k_max):
            raise invalid(f"k must be in [1, k_max={k_max}]; got {k}")
    if WEIGHTS_INPUT in inputs:
        w = np.asarray(inputs[WEIGHTS_INPUT], np.float32)
        if w.ndim not in (1, 2) or (s is not None and w.shape[-1] != s):
            raise invalid(f"{WEIGHTS_INPUT} must have shape [{s}] or [batch, {s}], got {list(w.shape)}")
        if w.ndim == 2 and rows is not None and w.shape[0] not in (1, rows):
            raise invalid(f"{WEIGHTS_INPUT} must have 1 row or one row per query (batch size "
                          f"{rows}), got {w.shape[0]}")
        if not np.isfinite(w).all():
            raise invalid(f"{WEIGHTS_INPUT} must be finite, got {w.tolist()}")
