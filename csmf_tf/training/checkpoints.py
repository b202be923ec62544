"""Stage checkpoints: ``<run>/stage_<t>/{weights.*, ownership.json, config.json, metrics.json}``.

A checkpoint holds every model variable (weights, owners, masks), so loading it into a model built
from the same data restores the stage exactly. Written to a temporary directory and renamed into
place, so a crash never leaves a half-written stage behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from csmf_tf.models.cascade import CascadeTwoTower


#: Suffix of the intermediate checkpoint written after a stage's training and CPP, before recovery.
PRUNED_SUFFIX = "_pruned"


def stage_dir(out_dir: Path | str, stage: int, suffix: str = "") -> Path:
    return Path(out_dir) / f"stage_{stage}{suffix}"


def has_stage(out_dir: Path | str, stage: int, suffix: str = "") -> bool:
    return (stage_dir(out_dir, stage, suffix) / "metrics.json").exists()


def remove_stage(out_dir: Path | str, stage: int, suffix: str) -> None:
    shutil.rmtree(stage_dir(out_dir, stage, suffix), ignore_errors=True)


def ownership_map(model: CascadeTwoTower) -> dict:
    """Unit owners of every masked layer (``{tower: {layer: [owner per unit]}}``) and the output."""
    towers = {}
    for name, tower in zip(("user", "item"), model.towers):
        towers[name] = {w.layer.name: w.layer.unit_owner.numpy().tolist() for w in tower.wrappers}
    return {"objectives": list(model.objectives), "owner_stage": model.owner_stage.tolist(),
            "towers": towers}


def save_stage(model: CascadeTwoTower, out_dir: Path | str, stage: int, config, log: dict,
               suffix: str = "") -> Path:
    target = stage_dir(out_dir, stage, suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-stage_{stage}-", dir=target.parent))
    model.save_weights(str(tmp / "weights"))
    (tmp / "ownership.json").write_text(json.dumps(ownership_map(model)))
    (tmp / "config.json").write_text(json.dumps(config.to_json(), indent=2))
    (tmp / "metrics.json").write_text(json.dumps(log, indent=2, default=float))
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)
    return target


def load_stage(model: CascadeTwoTower, out_dir: Path | str, stage: int, suffix: str = "") -> dict:
    """Restore stage ``stage``'s checkpoint into ``model``, make that stage current, return its log."""
    path = stage_dir(out_dir, stage, suffix)
    if not (path / "ownership.json").exists():
        raise FileNotFoundError(f"no checkpoint for stage {stage} in {path}; run that stage first")
    if model.optimizer is None:
        # The checkpoint also holds the optimizer that trained the stage. A model without one would
        # defer that state and pour it into the next fit's fresh Adam (non-zero moments move frozen
        # weights), so give the state a placeholder to land in; every fit compiles its own optimizer.
        model.compile(optimizer=tf.keras.optimizers.Adam())
    model.load_weights(str(path / "weights")).expect_partial()
    expected = json.loads((path / "ownership.json").read_text())["owner_stage"]
    if not np.array_equal(model.owner_stage, expected):
        raise RuntimeError(f"checkpoint {path} did not restore the ownership it recorded")
    model.set_stage(stage)
    return json.loads((path / "metrics.json").read_text())


def completed_stages(out_dir: Path | str) -> list[int]:
    out = Path(out_dir)
    found = (re.fullmatch(r"stage_(\d+)", p.name) for p in out.glob("stage_*"))
    return sorted(int(m.group(1)) for m in found if m and has_stage(out, int(m.group(1))))


def check_same_config(out_dir: Path | str, stage: int, config) -> None:
    """Refuse to resume a run whose recorded configuration differs from ``config``."""
    recorded = json.loads((stage_dir(out_dir, stage) / "config.json").read_text())
    # Read back through the config class: a field added since the run was recorded takes its default.
    recorded = json.loads(json.dumps(type(config).from_json(recorded).to_json()))
    current = json.loads(json.dumps(config.to_json()))
    if recorded != current:
        changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        raise ValueError(f"{out_dir} holds a run with a different configuration (changed: {changed}); "
                         "use another output directory or delete it to start over")
