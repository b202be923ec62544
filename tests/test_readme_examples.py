"""The Python examples of README.md run as written (so the docs cannot drift).

Every ```python block of a document is run in order, as one script, in a fresh folder; a block that
appears in both documents runs once. The examples make their own small data (csmf_tf.data.synthetic).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md",)
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return [block for block in _BLOCK.findall(text)]


def _scripts() -> list[tuple[str, str]]:
    seen, scripts = set(), []
    for name in DOCUMENTS:
        path = REPO / name
        blocks = [b for b in python_blocks(path.read_text()) if b not in seen] if path.exists() else []
        seen.update(blocks)
        if blocks:
            scripts.append((name, "\n".join(blocks)))
    return scripts


def test_block_extraction():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a\n"]
    assert _scripts(), "no ```python block in README.md"


@pytest.mark.parametrize("name, script", _scripts(), ids=[name for name, _ in _scripts()])
def test_documented_python_runs(name, script, tmp_path):
    (tmp_path / "example.py").write_text(script)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    if "export_retrieval_model(" in script:  # the bring-your-own-data quick start
        assert "exposure/recall@50" in result.stdout
        assert any((tmp_path / "saved_models" / "mine").iterdir())  # the exported version
