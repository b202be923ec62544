"""The server fuzz harness: every request must get a status, none may crash the server.

Run it with ``python benchmarks/fuzz_server.py`` (:func:`.run.run_fuzz` does the work).

The server runs as its own process (``python -m pipelines.serve``). Request ``i`` is generated from
``numpy.random.default_rng([seed, i])`` alone, so any case can be replayed (``--only I``) whatever the
thread interleaving. Generators (:mod:`.grpc_cases`, :mod:`.mutators`, :mod:`.rest_cases`):

- valid requests (random users incl. invalid UTF-8 / empty / 10 kB ids, per-row or shared weights incl.
  zero and negative ones, random ``k``, output filters, all four signatures): must answer OK, and
  every row of a retrieval answer must be *that request's* answer: the returned items' scores equal
  the exact fused scores of the request's own user vector (:mod:`.reference`, from the exported tables),
  objective scores likewise, sorted, mostly the exact top-k. They run concurrently with the bad
  ones, so this also checks that micro-batching never mixes rows up. (Equality with the SavedModel's
  answer for the request alone is not required: ScaNN's candidates depend on the batch a query is
  searched in, which micro-batching changes.)
- wrong dtypes, ranks, shapes, batch sizes; oversized batches and messages; declared shapes of 2**62
  elements with one value; negative dimensions; tensor_content of the wrong length; unknown dtype
  enums; ``k`` of 0 / negative / int32 max; NaN / inf / huge weights; NaN / inf features; missing and
  extra inputs; unknown model / version / label / signature / output filter; undecodable protobuf
  bytes; the unimplemented RPCs; random GetModelMetadata / GetModelStatus requests;
- REST: random type swaps, ragged and 100,000-deep nesting, integers beyond int32/int64, NaN /
  Infinity literals, lone surrogates, bad base64, garbage / truncated / non-UTF-8 / non-object bodies,
  bodies above the limit, missing or chunked Content-Length, unknown paths, verbs, methods and
  versions, and raw bytes that are not HTTP at all.

Each case carries the set of statuses TF Serving's contract allows for it (e.g. only INVALID_ARGUMENT for
a dtype mismatch; the union when several faults are combined). A request *fails* the fuzz when its
status is outside that set, when it is a server fault (gRPC INTERNAL / UNKNOWN / DATA_LOSS, HTTP 500 /
502 / 503 / 504) or when no status arrives within ``--deadline_s``. At the end the server must still
be alive and answer a reference request exactly as before the fuzz. Prints the status distribution,
writes JSON (``--out``), exits 1 on any failure.
"""
