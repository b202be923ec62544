"""TF Serving's REST JSON <-> numpy: ``:predict`` bodies in, answers out, proto messages as JSON.

Requests come in row format (``{"instances": [...]}``, answered with ``{"predictions": ...}``) or
columnar format (``{"inputs": ...}``, answered with ``{"outputs": ...}``); binary strings travel as
``{"b64": ...}``. Each JSON value is converted to the signature's dtype here, strictly: no silent
wrap-around of integers, no ragged lists, no strings for numbers; anything else is INVALID_ARGUMENT.
"""
from __future__ import annotations

import base64
import json
import reprlib
from typing import Any

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from csmf_tf.serving.errors import invalid
from csmf_tf.serving.signatures import SignatureInfo, TensorSpecInfo

#: Deepest list nesting accepted in one input (numpy arrays have at most 32 or 64 dimensions; the
#: bound also keeps the recursive decoding far from Python's recursion limit).
MAX_JSON_DEPTH = 32


def _decode_leaves(value: Any, is_string: bool, name: str, is_bool: bool = False, depth: int = 0) -> Any:
    """Validate JSON leaves for the target dtype; ``{"b64": ..}`` and ``str`` become ``bytes``."""
    if isinstance(value, list):
        if depth >= MAX_JSON_DEPTH:
            raise invalid(f"input {name!r}: lists nested deeper than {MAX_JSON_DEPTH} levels")
        return [_decode_leaves(v, is_string, name, is_bool, depth + 1) for v in value]
    if isinstance(value, dict):
        if set(value) == {"b64"} and isinstance(value["b64"], str):
            try:
                raw = base64.b64decode(value["b64"], validate=True)
            except ValueError:
                raise invalid(f"input {name!r}: invalid base64 value") from None
            if not is_string:
                raise invalid(f"input {name!r}: a b64 value needs a string input")
            return raw
        raise invalid(f"input {name!r}: unexpected JSON object {_preview(value)}")
    if is_string:
        if isinstance(value, str):
            try:
                return value.encode("utf-8")
            except UnicodeEncodeError:   # a lone surrogate such as "\\ud800" has no UTF-8 form
                raise invalid(f"input {name!r}: string {value[:50]!r} is not valid Unicode (lone "
                              "surrogate); send binary values as {\"b64\": ...}") from None
        raise invalid(f"input {name!r}: expects strings but got {type(value).__name__} {_preview(value)}")
    if is_bool:
        if isinstance(value, bool):
            return value
        raise invalid(f"input {name!r}: expects true/false but got {type(value).__name__} {_preview(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"input {name!r}: expects numbers but got {type(value).__name__} {_preview(value)}")
    return value


def json_to_array(value: Any, spec: TensorSpecInfo, name: str) -> np.ndarray:
    """One input's JSON value as a numpy array of the signature's dtype (INVALID_ARGUMENT otherwise)."""
    is_string = spec.dtype == tf.string
    leaves = _decode_leaves(value, is_string, name, spec.dtype == tf.bool)
    try:
        if is_string:
            arr = np.array(leaves, dtype=object)
            if arr.dtype != object or any(not isinstance(x, bytes) for x in arr.ravel()):
                raise ValueError("ragged")
            return arr
        want = spec.numpy_dtype
        arr = np.array(leaves)
        if arr.dtype == object:
            if want.kind in "iu" and _has_big_int(leaves):
                raise invalid(f"input {name!r}: integer out of range for {spec.dtype.name}")
            raise ValueError("ragged")
        if want.kind in "iu":
            if arr.dtype.kind == "f" and (not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))):
                raise invalid(f"input {name!r}: expects integers ({spec.dtype.name}) but got "
                              f"{_preview(value)}")
            # astype would wrap silently (2**32 + 5 -> 5 for int32): refuse what does not fit.
            info = np.iinfo(want)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise invalid(f"input {name!r}: integer out of range for {spec.dtype.name} "
                              f"[{info.min}, {info.max}]")
        with np.errstate(over="ignore"):   # 1e39 -> inf in float32, as TF Serving's cast does
            return arr.astype(want)
    except ValueError:
        raise invalid(f"input {name!r}: nested lists must be rectangular") from None


def _has_big_int(leaves: Any) -> bool:
    """True if a (nested) list holds an int that numpy cannot hold in int64/uint64."""
    stack = [leaves]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 64:
            return True
    return False


_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxstring, _PREVIEW.maxother = 3, 60, 60
_PREVIEW.maxlist = _PREVIEW.maxdict = 6


def _preview(value: Any) -> str:
    """A bounded ``repr`` for error messages: a request may hold megabytes or nest 900 levels deep
    (plain ``repr`` / ``json.dumps`` would recurse into all of it)."""
    return _PREVIEW.repr(value)


def _single_input(sig: SignatureInfo) -> str:
    required = sig.required_inputs()
    if len(required) == 1:
        return required[0]
    if len(sig.inputs) == 1:
        return next(iter(sig.inputs))
    raise invalid(f"signature {sig.name!r} has several inputs {sorted(sig.inputs)}: give them by name")


def parse_predict_body(raw: bytes) -> tuple[dict, str]:
    """The JSON object of a ``:predict`` body and its ``signature_name`` (``""`` when absent)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"JSON parse error: {e}") from None
    except RecursionError:   # e.g. 100,000 nested '[': the parser's stack, not the server, gave up
        raise invalid("JSON parse error: nesting too deep") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    signature_name = body.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise invalid("signature_name must be a string")
    return body, signature_name


def decode_request(body: dict, sig: SignatureInfo) -> tuple[dict[str, np.ndarray], bool]:
    """``(inputs, row_format)`` from a ``:predict`` body."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise invalid("the request must have exactly one of 'instances' (row format) or 'inputs' "
                      "(columnar format)")
    if has_cols:
        cols = body["inputs"]
        if not isinstance(cols, dict) or (set(cols) == {"b64"}):
            cols = {_single_input(sig): cols}
        out = {}
        for name, value in cols.items():
            if name not in sig.inputs:
                raise invalid(f"input {name!r} not in signature {sig.name!r}; expected {sorted(sig.inputs)}")
            out[name] = json_to_array(value, sig.inputs[name], name)
        return out, False
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
        raise invalid("'instances' must be a non-empty list")
    if all(isinstance(r, dict) and set(r) != {"b64"} for r in rows):
        names = set(rows[0])
        for i, r in enumerate(rows):
            if set(r) != names:
                raise invalid(f"instance {i} has inputs {sorted(r)} but instance 0 has {sorted(names)}")
        out = {}
        for name in names:
            if name not in sig.inputs:
                raise invalid(f"input {name!r} not in signature {sig.name!r}; expected {sorted(sig.inputs)}")
            out[name] = json_to_array([r[name] for r in rows], sig.inputs[name], name)
        return out, True
    if any(isinstance(r, dict) and set(r) != {"b64"} for r in rows):
        raise invalid("'instances' must be all objects (named inputs) or all values (single input)")
    name = _single_input(sig)
    return {name: json_to_array(rows, sig.inputs[name], name)}, True


def _jsonable(arr: np.ndarray) -> Any:
    if arr.dtype == object or arr.dtype.kind == "S":
        def conv(x: Any) -> Any:
            if isinstance(x, bytes):
                try:
                    return x.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(x).decode("ascii")}
            return x
        return np.vectorize(conv, otypes=[object])(arr).tolist() if arr.size else arr.tolist()
    return arr.tolist()


def encode_response(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """``{"predictions": [...]}`` (row) or ``{"outputs": ...}`` (columnar), as TF Serving answers."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _jsonable(next(iter(outputs.values())))}
        return {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise invalid(f"outputs {sizes} do not share a batch dimension; use the columnar 'inputs' format")
    if len(outputs) == 1:
        return {"predictions": _jsonable(next(iter(outputs.values())))}
    cols = {k: _jsonable(v) for k, v in outputs.items()}
    n = next(iter(sizes.values()))
    return {"predictions": [{k: cols[k][i] for k in cols} for i in range(n)]}


def proto_json(message: Any) -> dict:
    """A TF Serving proto message as the JSON its REST API answers with (field names as in the proto)."""
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5 spells the flag differently
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)
