"""csmf_tf: Cascaded Selective Mask Fine-Tuning (CSMF) for multi-objective retrieval.

Importing this package selects tf-keras (Keras 2) for TensorFlow: TFRS and tfmot require it, and it
must be chosen before TensorFlow is imported for the first time anywhere in the process.

It also quiets TensorFlow's C++ start-up lines (``cuInit`` on a machine without a GPU, oneDNN notes)
unless ``TF_CPP_MIN_LOG_LEVEL`` is already set: :func:`show_native_logs`, called before TensorFlow
loads (the command line's ``--verbose`` does), brings them back.
"""
import os as _os

_os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
_NATIVE_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in _os.environ
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if _os.environ["TF_USE_LEGACY_KERAS"] != "1":
    raise ImportError("csmf_tf needs TF_USE_LEGACY_KERAS=1 (tf-keras); it is set to "
                      f"{_os.environ['TF_USE_LEGACY_KERAS']!r}")

__version__ = "0.1.0"


def show_native_logs() -> None:
    """Let TensorFlow's C++ log lines through (``TF_CPP_MIN_LOG_LEVEL=0``) unless the user chose a level;
    effective only before TensorFlow is first imported."""
    if not _NATIVE_LOG_LEVEL_FROM_USER:
        _os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
