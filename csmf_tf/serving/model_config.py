"""Which models the server serves: TF Serving's ``ModelServerConfig``, read and checked before anything loads.

Two ways to say it, as ``tensorflow_model_server`` takes them (mutually exclusive):

- ``--model_name NAME --model_base_path DIR``: one model; ``DIR`` is the model's own directory holding
  its ``<version>/`` subdirectories (:func:`single_model_config`);
- ``--model_config_file FILE``: TF Serving's ``ModelServerConfig`` text proto, any number of models, each
  with its own ``base_path``, ``model_version_policy`` and ``version_labels``
  (:func:`read_model_config`)::

    model_config_list {
      config {
        name: "csmf"
        base_path: "/models/csmf"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 3 versions: 4 } }   # or latest { num_versions: 2 }, all {}
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
      config { name: "other" base_path: "/models/other" }               # default policy: latest 1
    }

The file is parsed by protobuf's ``text_format`` into the message of tensorflow-serving-api, so exactly
the files TF Serving accepts parse here. A config is then refused as a whole, with a
:class:`ModelConfigError` naming the file and the field, when a model has no name or no ``base_path``,
its ``base_path`` is not a directory, two models share a name, a version policy is empty, a label points
to a version the policy does not serve (TF Serving's default, without
``--allow_version_labels_for_unavailable_models``), or it asks for what this server does not do
(``custom_model_config``, a platform other than ``tensorflow``, request logging). A config with no model
is refused too: a config file caught half-written on a reload must not unload every model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from csmf_tf.serving.layout import version_dirs

ModelConfig = model_server_config_pb2.ModelConfig
ModelServerConfig = model_server_config_pb2.ModelServerConfig


class ModelConfigError(ValueError):
    """A model configuration that cannot be served; the message names where (file or flag) and the field."""


def single_model_config(model_name: str, model_base_path: str | os.PathLike, num_versions: int = 1,
                        version_labels: Mapping[str, int] | None = None) -> ModelServerConfig:
    """The config that ``--model_name`` / ``--model_base_path`` stand for: latest ``num_versions`` versions."""
    config = ModelServerConfig()
    model = config.model_config_list.config.add(name=model_name, base_path=str(model_base_path),
                                                model_platform="tensorflow")
    model.model_version_policy.latest.num_versions = num_versions
    for label, version in (version_labels or {}).items():
        model.version_labels[label] = version
    return config


#: How the single-model form's fields are named in an error: by the flag that set them.
_FLAG_NAMES = {"name": "--model_name", "base_path": "--model_base_path",
               "model_version_policy": "--num_versions", "version_labels": "--version_label"}


def read_model_config(path: str | os.PathLike) -> ModelServerConfig:
    """Parse and check a ``--model_config_file`` (see module docstring); raises :class:`ModelConfigError`."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path}: cannot read the model config file: {e}") from None
    return parse_model_config(text, str(path))


def parse_model_config(text: str, source: str) -> ModelServerConfig:
    """``text`` as a ``ModelServerConfig``, checked; ``source`` names it in errors (usually the file)."""
    config = ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:   # "line:col : ... has no field named "bse_path"."
        raise ModelConfigError(f"{source}: not a tensorflow.serving.ModelServerConfig text proto: {e}") from None
    check_model_config(config, source)
    return config


def check_model_config(config: ModelServerConfig, source: str) -> None:
    """Refuse what cannot be served (see module docstring); ``source`` is the file, or ``"flags"``."""
    def field_of(i: int) -> Callable[[str], str]:
        if source == "flags":
            return lambda name: _FLAG_NAMES.get(name.split("[", 1)[0].split(".", 1)[0], name)
        return lambda name: f"model_config_list.config[{i}].{name}"

    if config.WhichOneof("config") == "custom_model_config":
        raise ModelConfigError(f"{source}: custom_model_config is not supported; use model_config_list")
    models = config.model_config_list.config
    if not models:
        raise ModelConfigError(f"{source}: model_config_list: no model is configured")
    first_index: dict[str, int] = {}
    for i, model in enumerate(models):
        field = field_of(i)
        if model.name in first_index:
            raise ModelConfigError(f"{source}: {field('name')}: model {model.name!r} is already configured "
                                   f"by model_config_list.config[{first_index[model.name]}]")
        _check_model(model, source, field)
        first_index[model.name] = i


def _check_model(model: ModelConfig, source: str, field: Callable[[str], str]) -> None:
    def refuse(name: str, message: str) -> ModelConfigError:
        return ModelConfigError(f"{source}: {field(name)}: {message}")

    if not model.name:
        raise refuse("name", "missing")
    if "/" in model.name or ":" in model.name or model.name.strip() != model.name:
        raise refuse("name", f"{model.name!r}: a model name cannot hold '/', ':' or surrounding blanks "
                             "(it is a REST path segment)")
    if not model.base_path:
        raise refuse("base_path", f"missing for model {model.name!r} (the model's directory, holding its "
                                  "version subdirectories)")
    if not Path(model.base_path).is_dir():
        what = "is not a directory" if Path(model.base_path).exists() else "does not exist"
        raise refuse("base_path", f"{model.base_path} {what}")
    if model.model_platform not in ("", "tensorflow"):
        raise refuse("model_platform", f"{model.model_platform!r} is not served (only 'tensorflow')")
    if model.model_type == model_server_config_pb2.OTHER:   # deprecated field; UNSPECIFIED / TENSORFLOW serve
        raise refuse("model_type", "OTHER is not served (only TENSORFLOW)")
    if model.HasField("logging_config"):
        raise refuse("logging_config", "request logging is not supported by this server")
    policy = model.model_version_policy
    if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
        raise refuse("model_version_policy.specific.versions", "empty: name at least one version")
    if any(v < 0 for v in policy.specific.versions):
        raise refuse("model_version_policy.specific.versions", "versions are non-negative integers")
    on_disk = sorted(version_dirs(model.base_path))
    served = policy_versions(model, on_disk)
    for label, version in sorted(model.version_labels.items()):
        if not label:
            raise refuse("version_labels", "a label cannot be empty")
        if version not in served:
            raise refuse(f"version_labels[{label!r}]",
                         f"label {label!r} points to version {version}, which model {model.name!r} does not "
                         f"serve ({describe_policy(model)}; versions on disk: {on_disk or 'none'})")


def policy_versions(model: ModelConfig, on_disk: Iterable[int]) -> set[int]:
    """The versions ``model``'s version policy asks for among ``on_disk`` (before any load can fail)."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    on_disk = sorted(on_disk, reverse=True)
    if choice == "all":
        return set(on_disk)
    if choice == "specific":
        return set(policy.specific.versions) & set(on_disk)
    return set(on_disk[:latest_count(model)])


def latest_count(model: ModelConfig) -> int:
    """N of ``latest { num_versions: N }``; 1 when no policy is set or N is 0, as in TF Serving."""
    return max(1, model.model_version_policy.latest.num_versions)


def describe_policy(model: ModelConfig) -> str:
    """``model_version_policy`` in a few words, for messages and logs."""
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return "policy: all versions"
    if choice == "specific":
        return f"policy: specific versions {sorted(policy.specific.versions)}"
    return f"policy: latest {latest_count(model)}"


__all__ = ["ModelConfig", "ModelConfigError", "ModelServerConfig", "check_model_config", "describe_policy",
           "latest_count", "parse_model_config", "policy_versions", "read_model_config", "single_model_config"]
