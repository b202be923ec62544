"""TF Serving's REST API (``/v1/models/...``) on the standard library's threading HTTP server.

Endpoints (as tensorflow.org/tfx/serving/api_rest documents them):

- ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict`` with ``{"signature_name": ..,
  "instances": [...]}`` (row format, answered with ``{"predictions": ...}``) or ``{"inputs": ...}``
  (columnar, answered with ``{"outputs": ...}``); binary strings as ``{"b64": ...}``;
- ``GET /v1/models/<name>[/versions/<v>]`` -> model status;
- ``GET /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata`` -> signature defs.

Errors are ``{"error": "..."}`` with the HTTP status of the gRPC code (:data:`errors.HTTP_STATUS`).
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import re
import reprlib
import socket
import threading
import time
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from csmf_tf.serving.core import PredictionCore
from csmf_tf.serving.errors import ServingError, invalid, not_found
from csmf_tf.serving.grpc_service import status_response
from csmf_tf.serving.signatures import SignatureInfo, TensorSpecInfo

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>[a-zA-Z]+)|/(?P<meta>metadata))?/?$")


# -- JSON <-> numpy -------------------------------------------------------------------------------------
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


def _proto_json(message: Any) -> dict:
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5 spells the flag differently
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         including_default_value_fields=True)


# -- HTTP server -----------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: clients reuse connections
    # The stdlib assumes HTTP/0.9 until a request line parses, and HTTP/0.9 answers carry no status
    # line: a garbage request line would get a bare HTML page. Every answer here has a status line.
    default_request_version = "HTTP/1.0"
    server: "RestServer"
    timeout = 60                    # idle keep-alive connections time out

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def handle(self) -> None:
        self.server.track(self, True)
        try:
            super().handle()
        finally:
            self.server.track(self, False)

    def handle_one_request(self) -> None:
        self._busy = False
        super().handle_one_request()
        self._busy = False
        if self.server.stopping:
            self.close_connection = True

    def parse_request(self) -> bool:
        self._busy = True    # a request line arrived: this connection is no longer idle
        return super().parse_request()

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: ServingError) -> None:
        self._send(error.http_status, {"error": error.message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP layer's own errors (bad request line 400, unknown method 501, URI too long 414,
        too many headers 431) as ``{"error": ...}`` JSON like every other error, connection closed."""
        short, long = self.responses.get(code, ("Error", ""))
        text = "; ".join(t for t in (message or short, explain or long) if t)
        self.log_error("code %d, message %s", code, text)
        body = json.dumps({"error": text}).encode("utf-8")
        self.send_response(code, short)    # the reason phrase stays ASCII: the details go in the body
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reject_unread_body(self, status: int, message: str, linger_bytes: int, linger_s: float = 2.0) -> None:
        """Answer, then close a connection whose request body was not read.

        Closing a socket with unread input makes the kernel send RST, which can destroy our answer
        in flight before the client reads it (the client then sees "connection reset" instead of
        413). So: answer with ``Connection: close``, shut our sending side, and read and discard
        what the client is still sending (bounded in bytes and time) before the socket is closed.
        """
        self.close_connection = True
        body = json.dumps({"error": message}).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            deadline = time.monotonic() + linger_s
            left = linger_bytes
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:   # reset, timeout: the answer went out, nothing more to do
            pass

    def _route(self) -> re.Match:
        m = _PATH.match(self.path.split("?", 1)[0])
        if m is None:
            raise not_found(f"Malformed request: {self.command} {self.path}")
        return m

    @staticmethod
    def _version(m: re.Match) -> int | None:
        v = m.group("version")
        if v is None:
            return None
        if not (v.isascii() and v.isdigit()):   # isdigit alone accepts "²", on which int() raises
            raise invalid(f"version must be an integer, got {v!r}")
        return int(v)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        try:
            m = self._route()
            if m.group("verb"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"use POST for :{m.group('verb')}")
            core = self.server.core
            if m.group("meta"):
                version, defs = core.metadata(m.group("name"), self._version(m), m.group("label"))
                sig_map = get_model_metadata_pb2.SignatureDefMap()
                for k, v in defs.items():
                    sig_map.signature_def[k].CopyFrom(v)
                self._send(200, {"model_spec": {"name": m.group("name"), "signature_name": "",
                                                "version": str(version)},
                                 "metadata": {"signature_def": _proto_json(sig_map)}})
                return
            if m.group("label"):
                raise invalid("model status takes a version, not a label")
            response = status_response(core, m.group("name"), self._version(m))
            self._send(200, _proto_json(response))
        except ServingError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001
            log.exception("GET %s failed", self.path)
            self._error(ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = self.headers.get("Content-Length")
            limit = self.server.core.limits.max_message_bytes
            if length is None or not length.isascii() or not length.isdigit():
                # The body's end is unknown (chunked, garbage length): the connection is unusable.
                self._reject_unread_body(411, "Content-Length is required", limit)
                return
            size = int(length)
            if size > limit:
                self._reject_unread_body(
                    413, f"request body of {size} bytes exceeds the limit of {limit} bytes", min(size, 4 * limit))
                return
            try:
                raw = self.rfile.read(size)
            except (TimeoutError, OSError):
                # The client announced more bytes than it sent and went quiet (408), or reset the
                # connection (then the answer cannot be delivered): drop the connection either way.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._send(408, {"error": f"timed out reading a request body of {size} bytes"})
                return
            if len(raw) < size:   # the client closed its side early: what arrived is not the body
                self.close_connection = True
                raise invalid(f"request body ended after {len(raw)} of {size} bytes (Content-Length)")
            m = self._route()
            verb = m.group("verb")
            if m.group("meta") or verb is None:
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"use GET for {self.path}")
            if verb != "predict":
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                   f":{verb} is not supported; the model has predict signatures")
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
            fmt: dict[str, bool] = {}

            def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
                inputs, fmt["rows"] = decode_request(body, sig)
                return inputs

            core = self.server.core
            result = core.predict(m.group("name"), decode, version=self._version(m),
                                  version_label=m.group("label"), signature_name=signature_name,
                                  deadline=core.deadline(None))
            self._send(200, encode_response(result.outputs, fmt["rows"]))
        except ServingError as e:
            self._error(e)
        except RecursionError:   # some structure in the body nested too deeply for the decoders
            self._error(invalid("the request nests too deeply"))
        except Exception as e:  # noqa: BLE001
            log.exception("POST %s failed", self.path)
            self._error(ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    def do_PUT(self) -> None:  # noqa: N802
        self._send(405, {"error": f"method {self.command} not allowed"})

    do_DELETE = do_PUT
    do_PATCH = do_PUT


class RestServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its connections, so a shutdown can drain them.

    Busy connections finish their request (answered with ``Connection: close``); idle keep-alive
    connections are closed at once instead of holding the shutdown until they time out.
    """

    daemon_threads = False       # server_close() joins request threads: in-flight requests finish
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], core: PredictionCore) -> None:
        self.core = core
        self.stopping = False
        self._conns: set[_Handler] = set()
        self._conns_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def track(self, handler: _Handler, alive: bool) -> None:
        with self._conns_lock:
            (self._conns.add if alive else self._conns.discard)(handler)

    def drain(self) -> None:
        """Stop accepting, let busy requests finish, close idle connections, join all threads."""
        self.stopping = True
        self.shutdown()                           # stops serve_forever (no new connections)
        with self._conns_lock:
            idle = [h for h in self._conns if not getattr(h, "_busy", False)]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()                       # joins the handler threads
