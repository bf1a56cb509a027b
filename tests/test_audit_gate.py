"""Scheduled audits that alert: rules, gates and their exit codes, ``audit RUN_DIR`` and JUnit XML."""

from __future__ import annotations

import json
import os

import junitparser
import pytest

from pipelines import smoothgrad_audit
from pipelines.audit import command, findings, gate, rules
from tests import helpers

# Every class's maps sit on the border far more than this: border_attention warns for every class.
WARN_ALL = "border_attention: {warn: 0.01}\n"
# unconverged_maps fails whatever the maps (a share is always >= 0).
FAIL_ONE = "unconverged_maps: {warn: 0.0, fail: 0.0}\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny audited run (16 labelled records, 3 classes) and a folder for rules files."""
    folder = tmp_path_factory.mktemp("gate")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=8, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    args = ["--input", str(folder / "data" / "*.tfrecord"), "--output", str(folder / "out"), "--model", model,
            "--samples", "4", "--batch_size", "4"]
    assert smoothgrad_audit.main([*args, "--run_id", "nightly"]) == 0
    return {"folder": folder, "args": args, "run_dir": str(folder / "out" / "run_id=nightly")}


def _rules_file(folder, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ rules
@pytest.mark.parametrize("raw, message", [
    ({"border_atention": {"warn": 2}}, "unknown check 'border_atention'; checks: shortcut_region"),
    ({"border_attention": {"wran": 2}}, "audit rule 'border_attention.wran': unknown setting 'wran'; allowed: "
                                        "enabled, warn, fail, ignore_classes."),
    ({"border_attention": {"warn": "high"}}, "audit rule 'border_attention.warn': expected a number or null"),
    ({"border_attention": {"enabled": "yes"}}, "audit rule 'border_attention.enabled': expected true or false"),
    ({"border_attention": {"ignore_classes": [-1]}}, "expected a list of class indices"),
    ({"error_rate": {"warn": 0.1, "fail": 0.05}}, "audit rule 'error_rate.fail': expected at least warn (0.1)"),
    ({"drift_class_mean": {"warn": 0.8, "fail": 0.9}}, "audit rule 'drift_class_mean.fail': expected at most warn"),
    ({"shortcut_region": {"margin": None}}, "audit rule 'shortcut_region.margin': expected a number; got null."),
    ({"border_attention": 3}, "audit rule 'border_attention': expected a mapping of settings"),
    ([1, 2], "expected a mapping of check names to settings; got list"),
])
def test_a_wrong_rule_is_one_line_naming_the_key(raw, message):
    with pytest.raises(rules.RulesError) as caught:
        rules.parse(raw)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_defaults_overrides_and_directions():
    parsed = rules.parse({"border_attention": {"warn": 2.0, "fail": 3, "ignore_classes": [4, 1, 4]},
                          "drift_map_agreement": {"agreement": 0.5}})
    assert parsed["border_attention"] == {"enabled": True, "warn": 2.0, "fail": 3.0, "ignore_classes": [1, 4]}
    assert parsed["drift_map_agreement"]["agreement"] == 0.5
    assert parsed["error_rate"]["warn"] == rules.RULES["error_rate"].warn  # untouched checks keep defaults
    assert [rules.status(parsed, "border_attention", value) for value in (1.9, 2.0, 2.9, 3.0)] == \
        ["pass", "warn", "warn", "fail"]
    # "below" checks are worse when lower: a class mean agreement warns under 0.92 and fails under 0.8
    assert [rules.status(parsed, "drift_class_mean", value) for value in (0.95, 0.8, 0.6, float("nan"))] == \
        ["pass", "warn", "fail", "pass"]
    assert rules.threshold(parsed, "drift_new_shortcut") == rules.RULES["drift_new_shortcut"].fail


def test_turned_off_and_ignored_checks_still_appear_as_passing():
    checks = [findings.Check("border_attention", "warn", "Class 1: border.", target=1),
              findings.Check("border_attention", "warn", "Class 2: border.", target=2),
              findings.Check("error_rate", "fail", "Errors."), findings.Check("audit", "fail", "Could not run.")]
    applied = rules.apply(rules.parse({"border_attention": {"ignore_classes": [2]},
                                       "error_rate": {"enabled": False}}), checks)
    assert [(check.check, check.target, check.status) for check in applied] == [
        ("border_attention", 1, "warn"), ("border_attention", 2, "pass"), ("error_rate", None, "pass"),
        ("audit", None, "fail")]
    assert applied[1].summary.startswith("Ignored by the audit rules (border_attention.ignore_classes)")
    assert applied[2].summary.startswith("Not checked: turned off by the audit rules")


def test_the_defaults_table_lists_every_check():
    table = rules.table()
    assert all(f"| `{name}` |" in table for name in rules.RULES)


# ------------------------------------------------------------------ gate and JUnit
def _suites(path: str) -> list:
    xml = junitparser.JUnitXml.fromfile(path)
    return list(xml) if isinstance(xml, junitparser.JUnitXml) else [xml]


def _document():
    return findings.findings("r1", [
        findings.Check("shortcut_region", "fail", "Shortcut in class 2.", target=2, measure=0.8, threshold=0.2,
                       keys=["a", "b"]),
        findings.Check("border_attention", "warn", "Class 1 looks at borders.", target=1, measure=1.7,
                       threshold=1.5),
        findings.Check("error_rate", "pass", "No errors.", measure=0.0, threshold=0.01)])


@pytest.mark.parametrize("fail_on, tripped, failing", [
    ("never", False, []), ("fail", True, ["shortcut_region class 2"]),
    ("warn", True, ["shortcut_region class 2", "border_attention class 1"])])
def test_each_gate_level(fail_on, tripped, failing):
    outcome = gate.evaluate(_document(), fail_on)
    assert (outcome.tripped, outcome.failing, outcome.status) == (tripped, failing, "fail")
    assert ("tripped" in outcome.message()) == tripped
    if tripped:
        assert all(name in outcome.message() for name in failing) and "exit 3" in outcome.message()


@pytest.mark.parametrize("fail_on, failures", [("fail", 1), ("warn", 2), ("never", 1)])
def test_junit_xml_is_read_by_a_junit_parser(tmp_path, fail_on, failures):
    path = gate.write_junit(str(tmp_path / "reports" / "audit.xml"), _document(), fail_on)
    suites = _suites(path)
    cases = [case for suite in suites for case in suite]
    assert len(cases) == 3
    assert sum(suite.failures for suite in suites) == failures
    by_name = {case.name: case for case in cases}
    shortcut = by_name["shortcut_region class 2"]
    assert not shortcut.is_passed and shortcut.result[0].message == "Shortcut in class 2."
    assert shortcut.result[0].type == "fail"
    warned = by_name["border_attention class 1"]
    assert warned.is_passed == (fail_on != "warn")
    if warned.is_passed:
        assert "WARN border_attention class 1" in (warned.system_out or "")
    assert by_name["error_rate"].is_passed


# ------------------------------------------------------------------ the audit command
def test_audit_on_a_finished_run_equals_its_own_findings(finished, capsys):
    own = findings.read(finished["run_dir"])
    out = str(finished["folder"] / "again")
    assert command.main([finished["run_dir"], "--out", out, "--fail_on", "never"]) == 0
    again = findings.read(out)
    assert again == own
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(own["checks"]) + 1
    assert printed[-1] == f"{own['status']} {out}/_FINDINGS.json"
    statuses = [line.split()[0] for line in printed[:-1]]
    assert statuses == sorted(statuses, key=lambda status: ["FAIL", "WARN", "PASS"].index(status))


@pytest.mark.parametrize("text, fail_on, code", [
    ("", "fail", 0), (WARN_ALL, "fail", 0), (WARN_ALL, "warn", 3), (FAIL_ONE, "fail", 3), (FAIL_ONE, "never", 0)])
def test_audit_command_exit_codes(finished, text, fail_on, code, tmp_path):
    path = _rules_file(tmp_path, "rules.yaml", text or "{}\n")
    junit = str(tmp_path / "junit.xml")
    out = str(tmp_path / "findings")
    assert command.main([finished["run_dir"], "--rules", path, "--out", out, "--fail_on", fail_on,
                         "--junit", junit]) == code
    document = findings.read(out)
    assert junitparser.JUnitXml.fromfile(junit) is not None
    if text == WARN_ALL:
        assert {check["status"] for check in document["checks"] if check["check"] == "border_attention"} == {"warn"}
    assert not os.path.exists(os.path.join(finished["run_dir"], "junit.xml"))


@pytest.mark.parametrize("text, message", [
    ("border_attention: {wran: 2}\n", "audit rule 'border_attention.wran': unknown setting 'wran'"),
    ("border_attention: [\n", "is not valid YAML"),
])
def test_a_bad_rules_file_is_one_line_and_exit_2(finished, tmp_path, capsys, text, message):
    path = _rules_file(tmp_path, "bad.yaml", text)
    assert command.main([finished["run_dir"], "--rules", path]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("smoothgrad-audit audit: error: ")


def test_a_missing_rules_file_and_a_missing_run_are_exit_2(finished, tmp_path, capsys):
    assert command.main([finished["run_dir"], "--rules", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert command.main([str(tmp_path / "no-run")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ the gate of a run
def test_a_run_whose_gate_trips_writes_everything_and_exits_3(finished, tmp_path, capsys):
    junit = str(tmp_path / "run-junit.xml")
    rules_path = _rules_file(tmp_path, "rules.yaml", FAIL_ONE)
    code = smoothgrad_audit.main([*finished["args"], "--run_id", "gated", "--audit_rules", rules_path,
                                  "--fail_on", "fail", "--junit", junit])
    assert code == gate.EXIT_GATE
    run_dir = os.path.join(os.path.dirname(finished["run_dir"]), "run_id=gated")
    manifest = json.load(open(os.path.join(run_dir, "_MANIFEST.json")))
    assert manifest["gate"] == {"fail_on": "fail", "status": "fail", "tripped": True,
                                "failing": ["unconverged_maps"], "junit": junit, "junit_error": None}
    assert manifest["rows_written"] == 16 and findings.read(run_dir)["status"] == "fail"
    assert sum(suite.failures for suite in _suites(junit)) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if " pipelines." in line]
    assert ours[-1] == ("ERROR pipelines.smoothgrad_audit: Audit gate (fail_on: fail) tripped by 1 check(s): "
                        "unconverged_maps; exit 3.")


def test_a_run_with_the_default_gate_records_it_and_exits_0(finished):
    manifest = json.load(open(os.path.join(finished["run_dir"], "_MANIFEST.json")))
    assert manifest["gate"]["fail_on"] == "never" and manifest["gate"]["tripped"] is False
    assert manifest["gate"]["status"] == findings.read(finished["run_dir"])["status"]


@pytest.mark.parametrize("extra, message", [
    (["--fail_on", "warn", "--audit=false"], "config key 'fail_on': needs 'audit: true'"),
    (["--fail_on", "sometimes"], "config key 'fail_on': expected one of ('never', 'warn', 'fail')"),
    (["--audit_rules", "/nonexistent/rules.yaml"], "cannot read '/nonexistent/rules.yaml'"),
])
def test_gate_settings_are_checked_before_the_run(finished, capsys, extra, message):
    assert smoothgrad_audit.main([*finished["args"], "--run_id", "never-started", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(os.path.join(os.path.dirname(finished["run_dir"]), "run_id=never-started"))
