"""Command-line pipelines (``python -m pipelines.<name>`` or ``csmf <command>``)."""
import sys as _sys

if "--verbose" in _sys.argv[1:]:  # before any pipeline imports TensorFlow
    import csmf_tf as _csmf_tf

    _csmf_tf.show_native_logs()
