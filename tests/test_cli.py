"""The ``csmf`` command and the command lines' answers to wrong input (one line, before any training)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
COMMANDS = ("main", "train", "experiments", "tune-fusion", "export", "serve", "retrieve", "generate-data")


def _check_help(text: str) -> None:
    assert text.startswith("usage: csmf <command>")
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)


def test_csmf_script_help_lists_every_command_once():
    script = Path(sys.executable).parent / "csmf"
    if not script.exists():
        pytest.skip("the csmf console script is not installed (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, env=ENV,
                            cwd="/")  # anywhere: the installed package, not the checkout's folder
    assert result.returncode == 0, result.stderr
    _check_help(result.stdout)


def test_module_help_and_passthrough_to_a_pipeline():
    result = subprocess.run([sys.executable, "-m", "csmf_tf.cli", "--help"], capture_output=True, text=True,
                            timeout=60, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    _check_help(result.stdout)
    # Arguments after the command reach the pipeline's own parser.
    result = subprocess.run([sys.executable, "-m", "csmf_tf.cli", "generate-data", "--help"], capture_output=True,
                            text=True, timeout=60, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: csmf generate-data") and "--num-exposures" in result.stdout


def test_unknown_command_and_no_command(capsys):
    from csmf_tf import cli

    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert set(cli.COMMANDS) == set(COMMANDS)
    assert cli.COMMANDS["train"][0] == "pipelines.train_cascade"
    assert cli.COMMANDS["generate-data"][0] == "pipelines.generate_data"


# ----- wrong input: one line naming the file, the column or rule, and what was expected -----------------

ROWS = ["user,item,label", "u1,i1,1", "u1,i2,2", "u2,i1,3", "u2,i3,1", "u3,i2,2"]
SPEC = {"column_mapping": {"user_id": "user", "item_id": "item"},
        "labels": {"exposure": "1", "click": "label>=2", "conversion": "label>=3"}}


def _fail(tmp_path, spec=SPEC, rows=ROWS, extra=()) -> str:
    """Run the training command line on a tiny CSV; it must stop before training with a one-line message."""
    from pipelines import train_cascade

    data, spec_path, out = tmp_path / "events.csv", tmp_path / "spec.json", tmp_path / "run"
    data.write_text("\n".join(rows) + ("\n" if rows else ""))
    spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    with pytest.raises(SystemExit) as stop:
        train_cascade.main(["--dataset", "csv", "--data-path", str(data), "--csv-spec", str(spec_path),
                            "--out", str(out), *extra])
    message = str(stop.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    assert not out.exists()  # nothing was trained
    return message


def test_spec_names_a_column_the_file_does_not_have(tmp_path):
    spec = {**SPEC, "column_mapping": {"user_id": "user_id", "item_id": "item"}}
    message = _fail(tmp_path, spec)
    assert "events.csv" in message and "'user_id'" in message and "not found" in message
    assert "['user', 'item', 'label']" in message  # what the file has


def test_file_without_the_mapped_columns(tmp_path):
    message = _fail(tmp_path, rows=["a,b,c", "1,2,3"])
    assert "events.csv" in message and "['item', 'label', 'user']" in message and "['a', 'b', 'c']" in message


@pytest.mark.parametrize("rule, expected", [
    ("label=>2", "labels['click'] = 'label=>2' is not a label rule; expected 0 or 1"),
    ("lable>=2", "column(s) ['lable'] not found"),
])
def test_label_rule_typo(tmp_path, rule, expected):
    message = _fail(tmp_path, {**SPEC, "labels": {**SPEC["labels"], "click": rule}})
    assert expected in message and ("spec.json" in message)


@pytest.mark.parametrize("spec, expected", [
    ({"column_mapping": SPEC["column_mapping"]}, "missing key 'labels'"),
    ({"labels": SPEC["labels"]}, "missing key 'column_mapping'"),
    ({**SPEC, "column_mapping": {"user_id": "user"}}, "column_mapping has no 'item_id'"),
    ({**SPEC, "column_mapping": {"user": "user", "item_id": "item"}}, "column_mapping key 'user'"),
    ({**SPEC, "delimeter": ","}, "unknown key 'delimeter' (did you mean 'delimiter'?)"),
    ('{"column_mapping": {"user_id": "user",}', "not valid JSON"),
])
def test_spec_with_a_missing_or_unknown_key(tmp_path, spec, expected):
    message = _fail(tmp_path, spec)
    assert expected in message and "spec.json" in message


def test_empty_file_and_header_only_file(tmp_path):
    message = _fail(tmp_path, rows=[])
    assert "events.csv" in message and "empty file, expected a header line" in message
    message = _fail(tmp_path, rows=ROWS[:1])
    assert "events.csv" in message and "no data rows" in message


def test_objective_without_positives(tmp_path):
    message = _fail(tmp_path, {**SPEC, "labels": {**SPEC["labels"], "conversion": "label>=5"}})
    assert "events.csv" in message and "objective 'conversion' has no positive row" in message
    assert "'label>=5'" in message and "expected at least one positive" in message


def test_missing_data_file_and_objectives_that_are_not_the_datas(tmp_path):
    from pipelines import train_cascade

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    with pytest.raises(SystemExit, match="--data-path: no such file: .*nowhere.csv"):
        train_cascade.main(["--dataset", "csv", "--data-path", str(tmp_path / "nowhere.csv"), "--csv-spec", str(spec)])
    message = _fail(tmp_path, extra=["--objectives", "exposure,clicks"])
    assert "objective(s) ['clicks'] of --objectives are not in the data" in message
    assert "the data's objectives are exposure,click,conversion" in message
    message = _fail(tmp_path, extra=["--objectives", "click,exposure"])
    assert "not in the data's cascade order" in message


def test_too_few_items_or_no_validation_positives_stop_before_training(tmp_path):
    rows = ["user,item,label"] + [f"u{u},i{i},{1 + (u + i) % 3}" for u in range(30) for i in range(20)]
    message = _fail(tmp_path, rows=rows)
    assert "events.csv" in message and "20 items; expected at least 50" in message
