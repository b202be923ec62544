"""Support for tests, benchmarks and demos; nothing in :mod:`csmf_tf.serving` or training imports it.

- :mod:`~csmf_tf.testing.demo`: untrained towers and corpora with the trained towers' contract, and an
  exact numpy reference retrieval.
- :mod:`~csmf_tf.testing.smoke`: start a server, query it once over gRPC and REST, compare.
- :mod:`~csmf_tf.testing.processes`: the server and the exporter as child processes (``pipelines.*``).
- :mod:`~csmf_tf.testing.fuzz`: the server fuzz harness (``benchmarks/fuzz_server.py``).
"""
