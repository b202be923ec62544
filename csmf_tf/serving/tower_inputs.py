"""The towers' inputs as arguments of the exported signatures: their specs, naming rules, tensors,
and running a tower signature over a catalog in batches.

A SavedModel signature takes its input names from the Python parameter names of the function it
wraps, so every tower input becomes a real keyword parameter (:func:`keyword_function`), which is why
input names must be Python identifiers and must not clash with the retrieval signature's own inputs
(:func:`check_input_names`).
"""
from __future__ import annotations

import keyword
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from csmf_tf.serving.constants import K_INPUT, WEIGHTS_INPUT


def input_specs_of(model: tf.keras.Model) -> dict[str, tf.TensorSpec]:
    """``{input name: TensorSpec}`` of a functional tower, read from ``model.input`` / ``model.inputs``."""
    structure = model.input if isinstance(getattr(model, "input", None), dict) else None
    if structure is not None:
        items = list(structure.items())
    else:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError(f"cannot read the inputs of {model!r}; pass an explicit input spec")
        items = [(t.name.split(":")[0], t) for t in inputs]
    return {name: tf.TensorSpec(t.shape, t.dtype, name=name) for name, t in sorted(items)}


def check_input_names(specs: Mapping[str, tf.TensorSpec], what: str) -> dict[str, tf.TensorSpec]:
    """The specs, named after their keys, once every name is a usable signature argument."""
    out = {}
    for name, spec in specs.items():
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{what} input name {name!r} must be a Python identifier (it becomes a "
                             "signature argument); rename the Input layer")
        if name in (WEIGHTS_INPUT, K_INPUT):
            raise ValueError(f"{what} input name {name!r} is reserved by the retrieval signature")
        if not isinstance(spec, tf.TensorSpec):
            raise TypeError(f"{what} input {name!r}: expected tf.TensorSpec, got {type(spec).__name__}")
        if spec.shape.rank is None or spec.shape.rank < 1:
            raise ValueError(f"{what} input {name!r} needs a leading batch dimension, got shape {spec.shape}")
        out[name] = tf.TensorSpec(spec.shape, spec.dtype, name=name)
    if not out:
        raise ValueError(f"the {what} tower has no inputs")
    return out


def keyword_function(name: str, params: Sequence[str], body: Callable[[dict], Any],
                     defaults: Mapping[str, tf.Tensor] | None = None) -> Callable:
    """A Python function with named parameters ``params`` (defaults last) that calls ``body(dict)``.

    SavedModel signatures take their input names from the Python parameter names, and their
    SignatureDef ``defaults`` from tensor-valued Python defaults, so the parameters must really exist
    (``**kwargs`` would not do). Names were validated by :func:`check_input_names`.
    """
    defaults = dict(defaults or {})
    plain = [p for p in params if p not in defaults]
    with_default = [p for p in params if p in defaults]
    if list(params) != plain + with_default:
        raise ValueError("parameters with defaults must come last")
    namespace: dict[str, Any] = {"_body": body}
    args = list(plain)
    for p in with_default:
        namespace[f"_default_{p}"] = defaults[p]
        args.append(f"{p}=_default_{p}")
    src = (f"def {name}({', '.join(args)}):\n"
           f"    return _body({{{', '.join(f'{p!r}: {p}' for p in params)}}})\n")
    exec(compile(src, f"<csmf signature {name}>", "exec"), namespace)  # noqa: S102 - names validated
    return namespace[name]


def to_tensor(values: Any, spec: tf.TensorSpec) -> tf.Tensor:
    """``values`` as a tensor of ``spec``'s dtype (strings encoded to UTF-8 bytes)."""
    arr = np.asarray(values)
    if spec.dtype == tf.string:
        arr = np.asarray([v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()],
                         dtype=object).reshape(arr.shape)
    return tf.constant(arr, dtype=spec.dtype)


def embed_catalog(embed: Callable[..., dict], catalog_inputs: Mapping[str, np.ndarray],
                  spec: Mapping[str, tf.TensorSpec], output: str, batch_size: int = 4096,
                  what: str = "item catalog") -> np.ndarray:
    """Run an embedding signature over a whole catalog (items, or a sample of users) in batches;
    ``[n, D]`` float32 from its ``output``. ``what`` names the inputs in errors."""
    missing = sorted(set(spec) - set(catalog_inputs))
    if missing:
        raise ValueError(f"the {what} lacks tower inputs {missing} (it has {sorted(catalog_inputs)})")
    lengths = {name: len(catalog_inputs[name]) for name in spec}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the {what}'s columns differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"the {what} is empty")
    parts = []
    for start in range(0, n, batch_size):
        batch = {name: to_tensor(catalog_inputs[name][start:start + batch_size], s)
                 for name, s in spec.items()}
        parts.append(embed(**batch)[output].numpy())
    return np.concatenate(parts, axis=0).astype(np.float32)


def placeholder_inputs(spec: Mapping[str, tf.TensorSpec], batch: int = 1) -> dict[str, tf.Tensor]:
    """Harmless inputs for a warm-up query (out-of-vocabulary strings, zeros)."""
    out = {}
    for name, s in spec.items():
        shape = [batch] + [d if d is not None else 1 for d in s.shape.as_list()[1:]]
        if s.dtype == tf.string:
            out[name] = tf.fill(shape, "")
        else:
            out[name] = tf.zeros(shape, s.dtype)
    return out
