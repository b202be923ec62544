"""How the fuzz sends its cases: a gRPC channel (stubs and raw bytes) and raw HTTP over fresh sockets.

Every call returns ``(status, payload)``: the gRPC status name or ``HTTP_<code>``, or ``NO_ANSWER(...)``
when nothing came back within the deadline.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import grpc
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from csmf_tf.testing.fuzz.cases import OK


class Clients:
    """Per-thread clients: one gRPC channel, fresh HTTP connections (some cases close them)."""

    def __init__(self, grpc_target: str, rest_host: str, rest_port: int, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.channel = grpc.insecure_channel(grpc_target, options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024)])
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.raw_predict = self.channel.unary_unary("/tensorflow.serving.PredictionService/Predict",
                                                    request_serializer=lambda b: b,
                                                    response_deserializer=predict_pb2.PredictResponse.FromString)
        self.rest_host, self.rest_port = rest_host, rest_port

    def close(self) -> None:
        self.channel.close()

    def grpc_call(self, method: Callable, request: Any) -> tuple[str, Any]:
        """(status name, outputs as numpy or the response) -- ``NO_ANSWER`` when the deadline passed."""
        try:
            response = method(request, timeout=self.deadline_s)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "NO_ANSWER(deadline)", e.details()
            if code == grpc.StatusCode.UNAVAILABLE:
                return "NO_ANSWER(unavailable)", e.details()
            return code.name, e.details()
        if isinstance(response, predict_pb2.PredictResponse):
            return OK, {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
        return OK, response

    def raw_http(self, data: bytes) -> tuple[str, Any]:
        """Send raw bytes on a new connection; the status from the first response line."""
        try:
            with socket.create_connection((self.rest_host, self.rest_port), timeout=self.deadline_s) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                buf = b""
                while b"\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            return f"NO_ANSWER({type(e).__name__})", str(e)
        parts = buf.split(b" ", 2)
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
            return f"HTTP_{int(parts[1])}", buf
        return "NO_ANSWER(closed)", buf[:200]

    def http(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> tuple[str, Any]:
        """One request on a new connection; the body is sent while the answer is read, so a server that
        answers early (413) is heard even if it stops reading."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.rest_host}", "Connection: close"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + (body or b"")
        try:
            with socket.create_connection((self.rest_host, self.rest_port), timeout=self.deadline_s) as s:
                sender_error: list[BaseException] = []

                def send() -> None:
                    try:
                        s.sendall(data)
                    except OSError as e:   # the server answered and closed early; the answer is what counts
                        sender_error.append(e)

                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                chunks = []
                deadline = time.monotonic() + self.deadline_s
                while time.monotonic() < deadline:
                    try:
                        chunk = s.recv(65536)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                sender.join(timeout=self.deadline_s)
        except OSError as e:
            return f"NO_ANSWER({type(e).__name__})", str(e)
        raw = b"".join(chunks)
        head_end = raw.find(b"\r\n\r\n")
        first = raw.split(b"\r\n", 1)[0].split(b" ", 2)
        if head_end < 0 or len(first) < 2 or not first[1].isdigit():
            return "NO_ANSWER(incomplete)", raw[:200]
        return f"HTTP_{int(first[1])}", raw[head_end + 4:]
