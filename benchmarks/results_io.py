"""Where every benchmark's JSON goes (imported by the scripts next to it, which run as ``python benchmarks/x.py``)."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, out: str | Path) -> Path:
    """Write ``results`` as indented JSON to ``out`` (parents created) and say where."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}", flush=True)
    return path
