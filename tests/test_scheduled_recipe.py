"""The nightly recipe as documented: the example Airflow DAG's commands, run locally on two nights."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex

import junitparser
import pytest
import yaml

from pipelines import smoothgrad_audit
from pipelines.audit import findings
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_FILE = os.path.join(REPO, "examples", "airflow", "smoothgrad_audit_nightly.py")


def _dag_module():
    spec = importlib.util.spec_from_file_location("smoothgrad_audit_nightly", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # without Airflow installed: only the commands
    return module


def _run(command: str) -> int:
    """A command of the DAG, in this process: ``smoothgrad-audit ARGS`` is the console script's ``main(ARGS)``."""
    words = shlex.split(command)
    assert words[0] == "smoothgrad-audit"
    return smoothgrad_audit.main(words[1:])


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nightly")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=6, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    config = folder / "nightly.yaml"
    config.write_text(yaml.safe_dump({"input": [str(folder / "data" / "*.tfrecord")], "output": "unused",
                                      "model": model, "samples": 4, "batch_size": 4}))
    module = _dag_module()
    commands = {}
    for night in ("20261205", "20261206"):
        commands[night] = [template.replace(module.CONFIG, str(config)).replace(module.OUTPUT, str(folder / "audits"))
                           .replace("{{ ds_nodash }}", night) for template in (module.RUN, module.GATE, module.HISTORY)]
    return {"folder": folder, "output": str(folder / "audits"), "commands": commands, "module": module}


def test_the_dag_file_holds_the_three_commands():
    module = _dag_module()
    assert module.RUN.startswith("smoothgrad-audit --config") and "--baseline latest" in module.RUN
    assert "--compare_with latest" in module.RUN and "--junit" in module.RUN
    assert module.GATE.startswith("smoothgrad-audit audit ") and "--fail_on fail" in module.GATE
    assert module.HISTORY == f"smoothgrad-audit history {module.OUTPUT}"


def test_two_nights_of_the_recipe(nightly):
    output = nightly["output"]
    for night, (run, gate_command, history) in nightly["commands"].items():
        assert _run(run) == 0
        assert _run(gate_command) == 0  # the tiny model's findings have no failing check
        assert _run(history) == 0
    first, second = (os.path.join(output, f"run_id=nightly-{night}") for night in nightly["commands"])
    manifest = json.load(open(os.path.join(second, "_MANIFEST.json")))
    assert manifest["baseline"]["run_id"] == "nightly-20261205"  # the second night reused the first's rows
    assert manifest["records_reused"] == 12 and manifest["gate"]["tripped"] is False
    document = findings.read(second)
    drift = [check for check in document["checks"] if check["check"].startswith("drift_")]
    assert drift and all(check["status"] == "pass" for check in drift)  # the same model on the same data
    junit = junitparser.JUnitXml.fromfile(os.path.join(output, "junit", "nightly-20261206.xml"))
    assert sum(1 for suite in junit for _ in suite) == len(document["checks"])
    gate_findings = findings.read(os.path.join(output, "gate", "nightly-20261206"))
    assert gate_findings["status"] == document["status"]
    page = open(os.path.join(output, "_history", "index.html"), encoding="utf-8").read()
    assert "nightly-20261205" in page and "nightly-20261206" in page
    assert findings.read(first)["status"] in ("pass", "warn")
