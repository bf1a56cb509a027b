"""The audit gate, the one-line-per-check listing, and the findings as JUnit XML.

A scheduled audit must fail visibly: ``fail_on`` (``never``, ``warn`` or
``fail``) names the status from which the gate trips. A tripped gate changes
nothing that is written (corpus, manifest, findings, JUnit); the process then
exits with :data:`EXIT_GATE`. Exit codes of ``smoothgrad-audit``:

* 0: done, the gate did not trip;
* 1: a crash (a bug, or the runner failed);
* 2: bad input or configuration (one line says what);
* 3: the audit gate tripped (the last log line names the failing checks).

Example:

>>> outcome = evaluate(document, "warn")
>>> outcome.tripped, outcome.failing
(True, ['shortcut_region class 2'])
"""

from __future__ import annotations

import dataclasses
import datetime
import xml.etree.ElementTree as ElementTree

from pipelines.audit.findings import STATUSES

GATES = ("never", "warn", "fail")
EXIT_GATE = 3


def name(check: dict) -> str:
    """A check's name as listings show it: ``border_attention class 3``, or the check alone."""
    return check["check"] + ("" if check.get("class") is None else f" class {check['class']}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the gate decided: ``fail_on``, the findings' status, whether it tripped, and the checks that did."""

    fail_on: str
    status: str
    tripped: bool
    failing: list

    def as_dict(self) -> dict:
        """The manifest's ``gate`` block."""
        return dataclasses.asdict(self)

    def message(self) -> str:
        """The last log line of a run or an audit."""
        if not self.tripped:
            return f"Audit gate (fail_on: {self.fail_on}): passed; findings status {self.status}."
        shown = ", ".join(self.failing[:10]) + (f" and {len(self.failing) - 10} more" if len(self.failing) > 10 else "")
        return (f"Audit gate (fail_on: {self.fail_on}) tripped by {len(self.failing)} check(s): {shown}; "
                f"exit {EXIT_GATE}.")


def evaluate(document: dict, fail_on: str) -> Outcome:
    """The gate's outcome for a findings document."""
    if fail_on not in GATES:
        raise ValueError(f"fail_on: expected one of {GATES}; got {fail_on!r}.")
    if fail_on == "never":
        failing = []
    else:
        level = STATUSES.index(fail_on)
        failing = [name(check) for check in document["checks"] if STATUSES.index(check["status"]) >= level]
    return Outcome(fail_on=fail_on, status=document["status"], tripped=bool(failing), failing=failing)


def _number(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def line(check: dict) -> str:
    """One line per check: status, check, class, measure against threshold, summary."""
    return (f"{check['status'].upper():4} {name(check)}: {_number(check['measure'])} "
            f"(threshold {_number(check['threshold'])}): {check['summary']}")


def junit_xml(document: dict, fail_on: str = "fail") -> bytes:
    """The findings as JUnit XML: one test case per check.

    A check at or above the gate's level is a ``<failure>`` (type ``fail`` or
    ``warn``) whose message is its summary; a warning below the gate is a
    passing case whose ``<system-out>`` says ``WARN`` and why, so CI shows it
    without failing the job. With ``fail_on: never`` fails still count as
    failures (what a CI reader expects of a failed check) and warnings pass.
    """
    level = STATUSES.index("fail" if fail_on == "never" else fail_on)
    checks = document["checks"]
    failures = sum(STATUSES.index(check["status"]) >= level for check in checks)
    suites = ElementTree.Element("testsuites", name="smoothgrad-audit", tests=str(len(checks)),
                                 failures=str(failures), errors="0")
    suite = ElementTree.SubElement(suites, "testsuite", name=f"smoothgrad-audit run {document['run_id']}",
                                   tests=str(len(checks)), failures=str(failures), errors="0", skipped="0",
                                   timestamp=datetime.datetime.now(datetime.timezone.utc).strftime(
                                       "%Y-%m-%dT%H:%M:%S"))
    properties = ElementTree.SubElement(suite, "properties")
    for key, value in (("run_id", document["run_id"]), ("status", document["status"]), ("fail_on", fail_on)):
        ElementTree.SubElement(properties, "property", name=key, value=str(value))
    for check in checks:
        case = ElementTree.SubElement(suite, "testcase", classname=f"smoothgrad_audit.{check['check']}",
                                      name=name(check), time="0")
        details = line(check) + (f"\nkeys ({check['keys_total']}): " + ", ".join(check["keys"][:20])
                                 if check["keys"] else "")
        if STATUSES.index(check["status"]) >= level:
            failure = ElementTree.SubElement(case, "failure", message=check["summary"], type=check["status"])
            failure.text = details
        elif check["status"] != "pass":
            ElementTree.SubElement(case, "system-out").text = details
    ElementTree.indent(suites)
    return ElementTree.tostring(suites, encoding="utf-8", xml_declaration=True)


def write_junit(path: str, document: dict, fail_on: str) -> str:
    """Writes :func:`junit_xml` to ``path`` (local or ``gs://``); returns the path."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.support import storage

    parent = FileSystems.split(path)[0]
    if not storage.is_remote(path) and parent and not FileSystems.exists(parent):
        FileSystems.mkdirs(parent)
    with FileSystems.create(path) as handle:
        handle.write(junit_xml(document, fail_on))
    return path
