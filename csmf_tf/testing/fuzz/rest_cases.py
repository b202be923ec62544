"""Random REST cases: valid columnar and row requests, wrong JSON types and values, garbage bodies,
paths, verbs, methods, versions, and bytes that are not HTTP at all."""
from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from csmf_tf.testing.demo import DEMO_CITIES
from csmf_tf.testing.fuzz.cases import Case, Ctx, random_id

if TYPE_CHECKING:
    from csmf_tf.testing.fuzz.reference import Reference


def _json_user_columns(rng: np.random.Generator, ctx: Ctx) -> dict[str, list]:
    b = int(rng.integers(1, 6))
    ids: list[Any] = []
    for _ in range(b):
        raw = random_id(rng, ctx)
        try:
            ids.append(raw.decode("utf-8") if rng.random() < 0.8 else {"b64": base64.b64encode(raw).decode()})
        except UnicodeDecodeError:
            ids.append({"b64": base64.b64encode(raw).decode()})
    return {"user_id": ids, "age": [float(np.float32(x)) for x in rng.uniform(0, 100, b)],
            "city": [DEMO_CITIES[int(i)] for i in rng.integers(0, len(DEMO_CITIES), b)]}


def _random_json(rng: np.random.Generator, depth: int = 0) -> Any:
    """Any JSON value (nested up to a few levels)."""
    r = int(rng.integers(10 if depth < 3 else 7))
    if r < 7:
        return [None, True, "x", 1, 2.5, "", {"b64": "AAAA"}][r]
    if r == 7:
        return {"a": _random_json(rng, depth + 1)}
    return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]


def _wrong_json(rng: np.random.Generator, is_string: bool, rows: int) -> Any:
    """A JSON value that can never be a valid [rows] column of the given kind."""
    leaves = [None, True, False, 1, 2.5, {"a": 1}, {"b64": 5}, []] if is_string else \
        [None, True, "x", "", {"a": 1}, {"b64": "AAAA"}, []]
    bad = leaves[int(rng.integers(len(leaves)))]
    r = int(rng.integers(4))
    if r == 0:
        return bad                                    # a scalar (or object) instead of a list
    if r == 1:
        return [bad] * max(rows, 1)                   # right length, wrong leaf type
    if r == 2:
        return [[bad]] * max(rows, 1)                 # one level too deep
    return [bad] * (rows + 1)                         # wrong length and type


def _rest_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[Any], tuple[str, Any]]:
    return lambda c: c.http("POST", path, body, headers)


def rest_case(rng: np.random.Generator, ctx: Ctx, reference: Reference) -> Case:
    """One random REST case."""
    path = f"/v1/models/{ctx.model_name}:predict"
    r = rng.random()
    if r < 0.25:                                    # valid, columnar or row format
        cols = _json_user_columns(rng, ctx)
        b = len(cols["user_id"])
        inputs = {"user_id": np.array([base64.b64decode(u["b64"]) if isinstance(u, dict) else u.encode()
                                       for u in cols["user_id"]], dtype=object),
                  "age": np.asarray(cols["age"], np.float32), "city": np.array([c.encode() for c in cols["city"]],
                                                                               dtype=object)}
        if rng.random() < 0.5:
            body: dict[str, Any] = {"inputs": dict(cols)}
            if rng.random() < 0.5:
                w = rng.uniform(-1, 2, ctx.S).astype(np.float32)
                body["inputs"]["objective_weights"] = w.tolist()
                inputs["objective_weights"] = w
            if rng.random() < 0.6:
                k = int(rng.integers(1, ctx.k_max + 1))
                body["inputs"]["k"] = k
                inputs["k"] = np.int32(k)
            fmt = "columnar"
        else:
            body = {"instances": [{n: cols[n][i] for n in cols} for i in range(b)]}
            if rng.random() < 0.5:
                w = rng.uniform(-1, 2, (b, ctx.S)).astype(np.float32)
                for i in range(b):
                    body["instances"][i]["objective_weights"] = w[i].tolist()
                inputs["objective_weights"] = w
            fmt = "rows"
        if rng.random() < 0.3:
            body["signature_name"] = "serving_default"
        k = int(inputs.get("k", reference.default_k))
        return Case("rest", f"valid_{fmt}", {"HTTP_200"}, _rest_post(path, json.dumps(body).encode()),
                    _rest_check(reference, inputs, k, fmt))
    if r < 0.55:                                    # wrong JSON types / values
        cols: dict[str, Any] = _json_user_columns(rng, ctx)
        what = int(rng.integers(10))
        expect = {"HTTP_400"}
        if what == 0:
            name = str(rng.choice(sorted(cols)))
            cols[name] = _wrong_json(rng, name != "age", len(cols["age"]))
        elif what == 1:
            cols["age"] = [[1.0], [2.0, 3.0]]
        elif what == 2:
            depth = int(rng.choice([33, 100, 900, 5000, 100_000]))
            cols["age"] = "DEEP"
            text = json.dumps({"inputs": cols}).replace('"DEEP"', "[" * depth + "1" + "]" * depth)
            return Case("rest", "deep_nesting", expect, _rest_post(path, text.encode()))
        elif what == 3:
            cols["k"] = int(rng.choice([2 ** 31, 2 ** 32 + 5, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -2 ** 31 - 1, 0, -5]))
        elif what == 4:
            cols["k"] = [1.5, "5", True, None, [5], {"b64": "AAAA"}][int(rng.integers(6))]
        elif what == 5:
            text = json.dumps({"inputs": dict(cols, objective_weights=[1, 1, 1])}).replace(
                "[1, 1, 1]", ["[NaN, 1, 1]", "[1, Infinity, 1]", "[-Infinity, 0, 0]"][int(rng.integers(3))])
            return Case("rest", "nonfinite_literal", expect, _rest_post(path, text.encode()))
        elif what == 6:
            cols["age"] = [float(x) for x in rng.choice([1e39, -1e308, 1e308], len(cols["age"]))]
        elif what == 7:   # "\ud800" is valid JSON but no Unicode string: it has no UTF-8 form
            one = {k: v[:1] for k, v in cols.items()}
            text = json.dumps({"inputs": dict(one, user_id="SURR")}).replace('"SURR"', '["\\ud800"]')
            return Case("rest", "lone_surrogate", expect, _rest_post(path, text.encode()))
        elif what == 8:
            cols["user_id"] = [{"b64": s} for s in ["!!!", "AAA", "====", "\u00e9"][: len(cols["user_id"])]] or [{"b64": "!"}]
        else:
            cols[["extra", "K", ""][int(rng.integers(3))]] = [1.0]
        return Case("rest", f"bad_value_{what}", expect, _rest_post(path, json.dumps({"inputs": cols}).encode()))
    if r < 0.72:                                    # garbage bodies
        what = int(rng.integers(8))
        good = json.dumps({"inputs": _json_user_columns(rng, ctx)}).encode()
        if what == 0:
            body = bytes(rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8))
            return Case("rest", "garbage_body", {"HTTP_400"}, _rest_post(path, body))
        if what == 1:
            return Case("rest", "truncated_json", {"HTTP_400"}, _rest_post(path, good[: int(rng.integers(0, len(good)))]))
        if what == 2:
            return Case("rest", "non_object_json", {"HTTP_400"},
                        _rest_post(path, json.dumps([None, 1, "s", [1, 2], True][int(rng.integers(5))]).encode()))
        if what == 3:
            return Case("rest", "invalid_utf8", {"HTTP_400"}, _rest_post(path, good.replace(b'"u', b'"\xff\xfe', 1)))
        if what == 4:
            body = {"instances": _random_json(rng)} if rng.random() < 0.5 else {"inputs": _random_json(rng)}
            if rng.random() < 0.3:
                body = {"inputs": {}, "instances": []}
            return Case("rest", "bad_structure", {"HTTP_400"}, _rest_post(path, json.dumps(body).encode()))
        if what == 5:
            return Case("rest", "body_over_limit", {"HTTP_413"},
                        _rest_post(path, b" " * (ctx.max_bytes + int(rng.integers(1, 100_000)))))
        if what == 6:
            return Case("rest", "no_content_length", {"HTTP_411"},
                        lambda c: c.raw_http(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))
        return Case("rest", "signature_name_type", {"HTTP_400"},
                    _rest_post(path, json.dumps({"signature_name": [1], "inputs": {}}).encode()))
    if r < 0.92:                                    # paths, verbs, methods, versions
        cols = _json_user_columns(rng, ctx)
        body = json.dumps({"inputs": cols}).encode()
        m = ctx.model_name
        options: list[tuple[str, str, bytes | None, set[str]]] = [
            ("POST", "/v1/models/other:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/{ctx.version + 1}:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/{ctx.version}:predict", body, {"HTTP_200"}),
            ("POST", f"/v1/models/{m}/versions/99999999999999999999999:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}/versions/abc:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/versions/%C2%B2:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/versions/²:predict", body, {"HTTP_400"}),
            ("POST", f"/v1/models/{m}/labels/stable:predict", body, {"HTTP_404"}),
            ("POST", f"/v1/models/{m}:classify", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}:regress", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}:explode", body, {"HTTP_501"}),
            ("POST", f"/v1/models/{m}", body, {"HTTP_501"}),
            ("POST", f"/v2/models/{m}:predict", body, {"HTTP_404"}),
            ("POST", "/" + "a" * 5000, body, {"HTTP_404"}),
            ("GET", f"/v1/models/{m}", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version}", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version + 1}", None, {"HTTP_404"}),
            ("GET", f"/v1/models/{m}/metadata", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/versions/{ctx.version}/metadata", None, {"HTTP_200"}),
            ("GET", f"/v1/models/{m}/labels/x", None, {"HTTP_400"}),
            ("GET", f"/v1/models/{m}:predict", None, {"HTTP_501"}),
            ("GET", "/", None, {"HTTP_404"}),
            ("PUT", f"/v1/models/{m}:predict", body, {"HTTP_405"}),
            ("DELETE", f"/v1/models/{m}", None, {"HTTP_405"}),
            ("PATCH", f"/v1/models/{m}", body, {"HTTP_405"}),
        ]
        method, p, b, expect = options[int(rng.integers(len(options)))]
        return Case("rest", f"route_{method}", expect, lambda c: c.http(method, p, b, None))
    # not HTTP at all: the HTTP layer must still answer with a status
    what = int(rng.integers(4))
    if what == 0:
        data = b"FROB /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        expect = {"HTTP_501"}
    elif what == 1:
        data = bytes(rng.integers(32, 127, int(rng.integers(5, 200)), dtype=np.uint8)) + b"\r\n\r\n"
        expect = {"HTTP_400", "HTTP_501"}     # malformed request line / unknown method
    elif what == 2:
        data = b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"
        expect = {"HTTP_414"}
    else:
        data = b"POST /v1/models/x:predict HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n"
        expect = {"HTTP_431"}
    return Case("rest", "not_http", expect, lambda c: c.raw_http(data))


def _rest_check(reference: Reference, inputs: dict[str, np.ndarray], k: int, fmt: str) -> Callable[[Any], str | None]:
    def check(payload: bytes) -> str | None:
        body = json.loads(payload)
        rows = body["predictions"] if fmt == "rows" else None
        out = body["outputs"] if fmt == "columnar" else {n: [r[n] for r in rows] for n in rows[0]} if rows else {}
        ids = np.array([[x.encode() for x in row] for row in out["item_ids"]], dtype=object).reshape(-1, k)
        return reference.check_answer(inputs, k, ids, np.asarray(out["scores"], np.float32),
                                      np.asarray(out["objective_scores"], np.float32))
    return check
