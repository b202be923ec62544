"""TF Serving's REST API (``/v1/models/...``) on the standard library's threading HTTP server.

Endpoints (as tensorflow.org/tfx/serving/api_rest documents them):

- ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict`` with ``{"signature_name": ..,
  "instances": [...]}`` (row format, answered with ``{"predictions": ...}``) or ``{"inputs": ...}``
  (columnar, answered with ``{"outputs": ...}``); binary strings as ``{"b64": ...}``;
- ``GET /v1/models/<name>[/versions/<v>]`` -> model status;
- ``GET /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata`` -> signature defs and, for a CSMF
  export, ``model_info`` (the ``model_info`` signature's outputs, e.g. the measured ``ann_recall``).

Errors are ``{"error": "..."}`` with the HTTP status of the gRPC code (:data:`errors.HTTP_STATUS`).
The JSON codec is :mod:`csmf_tf.serving.rest_codec`; this module is the HTTP server around it. Every
answered request is counted and timed (:class:`csmf_tf.serving.monitoring.ServingMetrics`, ``code`` =
the HTTP status); with a monitoring config, ``GET <metrics path>`` answers the Prometheus scrape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import logging
import re
import socket
import threading
import time
from typing import Any, Iterator

import grpc
import numpy as np

from csmf_tf.serving.core import PredictionCore
from csmf_tf.serving.errors import ServingError, invalid, not_found
from csmf_tf.serving.monitoring import ServingMetrics
from csmf_tf.serving.rest_codec import decode_request, encode_response, parse_predict_body, proto_json
from csmf_tf.serving.signatures import SignatureInfo

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>[a-zA-Z]+)|/(?P<meta>metadata))?/?$")


@dataclasses.dataclass
class _Answered:
    """What the metrics record of one REST request (filled in as the request is handled)."""

    started: float
    method: str = "other"          # Predict / GetModelMetadata / GetModelStatus once routed
    model: str = ""
    version: int | None = None     # the version that answered
    signature: str = ""
    code: str | None = None        # the HTTP status sent; None: nothing sent (nothing to count)
    counted: bool = True           # False for the Prometheus scrape itself


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
        self._answered: _Answered | None = None
        super().handle_one_request()
        self._busy = False
        a = self._answered
        if a is not None and a.counted and a.code is not None:
            self.server.metrics.observe_request("rest", a.method, a.model, a.version, a.signature, a.code,
                                                time.perf_counter() - a.started)
        if self.server.stopping:
            self.close_connection = True

    def parse_request(self) -> bool:
        self._busy = True    # a request line arrived: this connection is no longer idle
        self._answered = _Answered(time.perf_counter())
        return super().parse_request()

    def _send(self, status: int, payload: dict, close: bool = False, reason: str | None = None) -> None:
        """Answer with ``payload`` as JSON; ``close`` (or a stopping server) ends the connection after it."""
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json", close, reason)

    def _send_bytes(self, status: int, body: bytes, content_type: str, close: bool = False,
                    reason: str | None = None) -> None:
        if self._answered is None:   # an answer before any request line parsed (e.g. 414)
            self._answered = _Answered(time.perf_counter())
        self._answered.code = str(status)
        self.send_response(status, reason)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close or self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, error: ServingError) -> None:
        self._send(error.http_status, {"error": error.message})

    @contextlib.contextmanager
    def _errors_answered(self) -> Iterator[None]:
        """Answer whatever the block raises with its status (INTERNAL for the unexpected), never crash."""
        try:
            yield
        except ServingError as e:
            self._error(e)
        except RecursionError:   # some structure in the body nested too deeply for the decoders
            self._error(invalid("the request nests too deeply"))
        except Exception as e:  # noqa: BLE001 - one request must never take the server down
            log.exception("%s %s failed", self.command, self.path)
            self._error(ServingError(grpc.StatusCode.INTERNAL, f"internal error: {e}"))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP layer's own errors (bad request line 400, unknown method 501, URI too long 414,
        too many headers 431) as ``{"error": ...}`` JSON like every other error, connection closed."""
        short, long = self.responses.get(code, ("Error", ""))
        text = "; ".join(t for t in (message or short, explain or long) if t)
        self.log_error("code %d, message %s", code, text)
        # The reason phrase stays ASCII: the details go in the body.
        self._send(code, {"error": text}, close=True, reason=short)

    def _reject_unread_body(self, status: int, message: str, linger_bytes: int, linger_s: float = 2.0) -> None:
        """Answer, then close a connection whose request body was not read.

        Closing a socket with unread input makes the kernel send RST, which can destroy our answer
        in flight before the client reads it (the client then sees "connection reset" instead of
        413). So: answer with ``Connection: close``, shut our sending side, and read and discard
        what the client is still sending (bounded in bytes and time) before the socket is closed.
        """
        self._send(status, {"error": message}, close=True)
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
        metrics_path = self.server.metrics_path
        if metrics_path is not None and self.path.split("?", 1)[0] == metrics_path:
            self._answered.counted = False
            body, content_type = self.server.metrics.exposition()
            self._send_bytes(200, body, content_type)
            return
        with self._errors_answered():
            m = self._route()
            if m.group("verb"):
                raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"use POST for :{m.group('verb')}")
            core = self.server.core
            answered = self._answered
            answered.model = m.group("name")
            if m.group("meta"):
                answered.method = "GetModelMetadata"
                version, sig_map, info = core.metadata(m.group("name"), self._version(m), m.group("label"))
                answered.version = version
                metadata = {"signature_def": proto_json(sig_map)}
                if info is not None:
                    metadata["model_info"] = info
                self._send(200, {"model_spec": {"name": m.group("name"), "signature_name": "",
                                                "version": str(version)}, "metadata": metadata})
                return
            answered.method = "GetModelStatus"
            if m.group("label"):
                raise invalid("model status takes a version, not a label")
            status = core.status(m.group("name"), self._version(m))
            answered.version = self._version(m)
            self._send(200, proto_json(status))

    def do_POST(self) -> None:  # noqa: N802
        with self._errors_answered():
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
            answered = self._answered
            answered.method, answered.model = "Predict", m.group("name")
            body, signature_name = parse_predict_body(raw)
            fmt: dict[str, bool] = {}

            def decode(sig: SignatureInfo) -> dict[str, np.ndarray]:
                inputs, fmt["rows"] = decode_request(body, sig)
                return inputs

            core = self.server.core
            result = core.predict(m.group("name"), decode, version=self._version(m),
                                  version_label=m.group("label"), signature_name=signature_name,
                                  deadline=core.deadline(None))
            answered.version, answered.signature = result.version, result.signature_name
            self._send(200, encode_response(result.outputs, fmt["rows"]))

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

    def __init__(self, address: tuple[str, int], core: PredictionCore, metrics: ServingMetrics | None = None,
                 metrics_path: str | None = None) -> None:
        self.core = core
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.metrics_path = metrics_path     # None: no Prometheus endpoint
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
