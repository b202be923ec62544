"""Random gRPC cases: valid requests on every signature, faulty retrievals, unknown names, garbage bytes,
the other RPCs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     inference_pb2, model_management_pb2, predict_pb2, regression_pb2)

from csmf_tf.testing.fuzz.cases import (EXHAUSTED, INVALID, NOT_FOUND, OK, UNIMPLEMENTED, Case, Ctx,
                                        predict_request, valid_retrieval_inputs, valid_user_inputs)
from csmf_tf.testing.fuzz.mutators import GRPC_MUTATIONS

if TYPE_CHECKING:
    from csmf_tf.testing.fuzz.reference import Reference
    from csmf_tf.testing.fuzz.transports import Clients


def _grpc_predict(req: predict_pb2.PredictRequest | bytes) -> Callable[[Any], tuple[str, Any]]:
    def send(clients: Clients) -> tuple[str, Any]:
        if isinstance(req, bytes):
            return clients.grpc_call(clients.raw_predict, req)
        return clients.grpc_call(clients.predict.Predict, req)
    return send


def _check_retrieval(reference: Reference, inputs: dict[str, np.ndarray], k: int, output_filter: list[str]
                     ) -> Callable[[dict[str, np.ndarray]], str | None]:
    def check(outputs: dict[str, np.ndarray]) -> str | None:
        names = output_filter or ["item_ids", "scores", "objective_scores"]
        if sorted(outputs) != sorted(names):
            return f"outputs {sorted(outputs)}, expected {sorted(names)}"
        return reference.check_answer(inputs, k, outputs.get("item_ids"), outputs.get("scores"),
                                      outputs.get("objective_scores"))
    return check


def grpc_case(rng: np.random.Generator, ctx: Ctx, reference: Reference) -> Case:
    """One random gRPC case."""
    r = rng.random()
    if r < 0.25:                                   # valid retrieval, compared with the SavedModel
        inputs = valid_retrieval_inputs(rng, ctx)
        req = predict_request(ctx, inputs, "serving_default" if rng.random() < 0.5 else None)
        flt: list[str] = []
        if rng.random() < 0.2:
            flt = sorted(set(rng.choice(["item_ids", "scores", "objective_scores"], int(rng.integers(1, 3)))))
            req.output_filter.extend(flt)
        k = int(inputs.get("k", reference.default_k))
        return Case("grpc", "valid_retrieval", {OK}, _grpc_predict(req), _check_retrieval(reference, inputs, k, flt))
    if r < 0.30:                                   # valid other signatures
        sig = ["user_embedding", "item_embedding", "model_info"][int(rng.integers(3))]
        if sig == "user_embedding":
            inputs = valid_user_inputs(rng, ctx)
        elif sig == "item_embedding":
            b = int(rng.integers(0, 6))
            inputs = {"item_id": np.array([f"i{int(i)}".encode() for i in rng.integers(0, 500, b)], dtype=object),
                      "category": np.array([b"c1"] * b, dtype=object)}
        else:
            inputs = {}
        return Case("grpc", f"valid_{sig}", {OK}, _grpc_predict(predict_request(ctx, inputs, sig)))
    if r < 0.72:                                   # 1-3 faults in an otherwise valid retrieval request
        inputs: dict[str, Any] = valid_retrieval_inputs(rng, ctx)
        names, weights = zip(*[(n, w) for n, _, w in GRPC_MUTATIONS])
        p = np.asarray(weights) / sum(weights)
        picked = rng.choice(len(GRPC_MUTATIONS), size=int(rng.integers(1, 4)), p=p, replace=False)
        expect: set[str] = set()
        kinds = []
        # The raw-TensorProto fault goes last: the other faults edit numpy values, not protos.
        for j in sorted(picked, key=lambda j: GRPC_MUTATIONS[int(j)][0] == "proto"):
            name, fn, _ = GRPC_MUTATIONS[int(j)]
            if name in ("k", "weights") and isinstance(inputs.get("user_id"), tensor_pb2.TensorProto):
                continue
            try:
                expect |= fn(rng, inputs, ctx)
            except (KeyError, ValueError, IndexError, TypeError):   # an earlier fault removed / replaced
                continue                                             # (by a raw TensorProto) what this edits
            kinds.append(name)
        if not kinds:
            expect = {OK}
        return Case("grpc", "fault:" + "+".join(sorted(set(kinds))) if kinds else "valid_retrieval",
                    expect, _grpc_predict(predict_request(ctx, inputs)))
    if r < 0.80:                                   # unknown model / version / label / signature / filter
        req = predict_request(ctx, valid_user_inputs(rng, ctx))
        what = int(rng.integers(5))
        if what == 0:
            req.model_spec.name = ["", "other", ctx.model_name.upper(), ctx.model_name + " ", "ü" * 50][int(rng.integers(5))]
        elif what == 1:
            req.model_spec.version.value = int(rng.choice([0, ctx.version + 1, 99, -1, 2 ** 63 - 1, -2 ** 63]))
        elif what == 2:
            req.model_spec.version_label = ["stable", "canary", "", "x" * 1000][int(rng.integers(4))] or "none"
        elif what == 3:
            req.model_spec.signature_name = ["ranking", "serving", "SERVING_DEFAULT", "__saved_model_init_op",
                                             "user_embedding "][int(rng.integers(5))]
        else:
            req.output_filter.append(["logits", "", "item_ids ", "scores\x00"][int(rng.integers(4))])
            return Case("grpc", "unknown_output_filter", {INVALID}, _grpc_predict(req))
        return Case("grpc", ["unknown_model", "unknown_version", "unknown_label", "unknown_signature"][what],
                    {NOT_FOUND}, _grpc_predict(req))
    if r < 0.88:                                   # bytes that are not (quite) a PredictRequest
        good = predict_request(ctx, valid_retrieval_inputs(rng, ctx)).SerializeToString()
        what = int(rng.integers(4))
        if what == 0:
            data = bytes(rng.integers(0, 256, int(rng.integers(1, 2000)), dtype=np.uint8))
        elif what == 1:
            data = good[: int(rng.integers(1, len(good)))]
        elif what == 2:   # model name with invalid UTF-8 (proto3 strings must be UTF-8)
            data = b"\x0a\x06\x0a\x04\xff\xfe\xfd\xfc"
        else:
            data = bytearray(good)
            for _ in range(int(rng.integers(1, 10))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            data = bytes(data)
        # Random bytes may happen to parse (unknown fields are skipped): then the model spec or the
        # inputs are what is wrong, or -- rarely -- a flipped byte landed in a value and it is valid.
        return Case("grpc", "undecodable_bytes", {INVALID, NOT_FOUND, EXHAUSTED, OK}, _grpc_predict(data))
    return _grpc_other_rpc(rng, ctx)


def _grpc_other_rpc(rng: np.random.Generator, ctx: Ctx) -> Case:
    what = int(rng.integers(6))
    if what == 0:
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = ctx.model_name if rng.random() < 0.7 else "other"
        fields = [f for f in ["signature_def", "signature_def", "x", ""] if rng.random() < 0.5]
        req.metadata_field.extend(fields)
        if req.model_spec.name != ctx.model_name:
            expect = {NOT_FOUND, INVALID}
        else:
            expect = {OK} if fields and all(f == "signature_def" for f in fields) else {INVALID}
        return Case("grpc", "get_model_metadata", expect,
                    lambda c: c.grpc_call(c.predict.GetModelMetadata, req))
    if what == 1:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = ctx.model_name if rng.random() < 0.7 else "other"
        v = int(rng.choice([0, ctx.version, ctx.version, ctx.version + 1, -3]))
        if rng.random() < 0.5:
            req.model_spec.version.value = v
        ok = req.model_spec.name == ctx.model_name and (not req.model_spec.HasField("version") or v == ctx.version)
        return Case("grpc", "get_model_status", {OK} if ok else {NOT_FOUND},
                    lambda c: c.grpc_call(c.model.GetModelStatus, req))
    stubs = [("Classify", classification_pb2.ClassificationRequest()), ("Regress", regression_pb2.RegressionRequest()),
             ("MultiInference", inference_pb2.MultiInferenceRequest()),
             ("HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest())]
    name, req = stubs[what - 2]
    return Case("grpc", f"unimplemented_{name}", {UNIMPLEMENTED},
                lambda c: c.grpc_call(getattr(c.model if name.startswith("Handle") else c.predict, name), req))
