"""The audit as the run's last step, and ``smoothgrad-audit audit RUN_DIR`` on a finished run.

As the last step of a run (``audit: true``) it runs where the pipeline runs
(the launcher's process on the local runner, a worker on Dataflow), after the
manifest is written: the corpus is complete whatever the audit finds. An
audit that cannot run does not lose the run: ``_FINDINGS.json`` then holds one
failing ``audit`` check that says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipelines.audit import findings, gate

logger = logging.getLogger(__name__)
PROG = "smoothgrad-audit audit"


def audit_after_run(manifest_path: str, run_dir: str) -> str:
    """The pipeline's ``Audit`` step: audits the run whose manifest was just written; returns the findings' path.

    Then, with the run config's ``junit``, writes the findings as JUnit XML, and
    records the gate (``fail_on``) and its outcome in the manifest's ``gate``
    block; the launcher reads it to exit with :data:`pipelines.audit.gate.EXIT_GATE`.

    Args:
        manifest_path: the written ``_MANIFEST.json`` (its arrival orders this step after the corpus).
        run_dir: the run folder.
    """
    from pipelines.audit.audit import audit_run

    del manifest_path
    try:
        document = audit_run(run_dir)
    except Exception as error:  # noqa: BLE001 - the corpus is written; say why the audit is missing
        from transforms.support.errors import one_line

        logger.error("The audit of %s could not run: %s: %s", run_dir, type(error).__name__, one_line(error))
        run_id = run_dir.rstrip("/").rsplit("run_id=", 1)[-1]
        document = findings.findings(run_id, [findings.Check(
            "audit", "fail", f"The audit could not run ({type(error).__name__}: {one_line(error)}); run "
                             f"'smoothgrad-audit audit {run_dir}' once the cause is fixed.")])
        findings.write(run_dir, document)
    record_gate(run_dir, document)
    return findings.FINDINGS


def record_gate(run_dir: str, document: dict) -> gate.Outcome:
    """Writes the run's JUnit XML (config ``junit``) and the manifest's ``gate`` block; returns the outcome."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.support import storage
    from transforms.write.corpus import MANIFEST

    path = FileSystems.join(run_dir.rstrip("/"), MANIFEST)
    with FileSystems.open(path) as handle:
        manifest = json.loads(handle.read().decode("utf-8"))
    config = manifest.get("config") or {}
    outcome = gate.evaluate(document, config.get("fail_on") or "never")
    junit_error = None
    if config.get("junit"):
        try:
            gate.write_junit(config["junit"], document, outcome.fail_on)
        except (OSError, IOError, ValueError) as error:  # the corpus and findings stand; say why the XML is missing
            from transforms.support.errors import one_line

            junit_error = f"{type(error).__name__}: {one_line(error)}"
            logger.error("Could not write the JUnit XML to %s: %s", config["junit"], junit_error)
    manifest["gate"] = dict(outcome.as_dict(), junit=config.get("junit"), junit_error=junit_error)
    storage.replace(path, json.dumps(manifest, indent=2).encode("utf-8"))
    return outcome


def parser() -> argparse.ArgumentParser:
    """The command line of ``smoothgrad-audit audit``."""
    from pipelines.report.pages import OneLineParser

    command = OneLineParser(prog=PROG, description=(
        "Audits a finished run again with the given rules, without explaining anything again (the corpus columns "
        "and the _audit/ aggregates the run wrote suffice; a shortcut candidate is re-tested on the model with its "
        "bounded sample), writes _FINDINGS.json, prints one line per check, and exits 3 when the gate trips."))
    command.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, OUTPUT/run_id=<RUN_ID> (local or gs://)")
    command.add_argument("--rules", metavar="FILE", help="a YAML rules file (default: the run's own audit_rules)")
    command.add_argument("--out", metavar="DIR", help="write _FINDINGS.json and the evidence here instead of RUN_DIR")
    command.add_argument("--fail_on", choices=gate.GATES, default="fail",
                         help="exit 3 when a check reaches this status (default: fail)")
    command.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML to FILE")
    command.add_argument("--compare_with", metavar="RUN_DIR",
                         help="drift checks against this run, or 'latest' (default: the run's own compare_with, "
                              "else its baseline)")
    return command


def main(argv: list[str] | None = None) -> int:
    """``smoothgrad-audit audit RUN_DIR``: one line per check, the findings' path; 2 on a mistake, 3 on the gate."""
    from pipelines.audit.audit import audit_run
    from pipelines.audit.rules import RulesError, load
    from pipelines.report.pages import run_command
    from pipelines.report.run_data import RunError

    outcome = {}

    def audit(args):
        try:
            rules = load(args.rules) if args.rules else None
        except RulesError as error:
            raise RunError(str(error)) from None
        document = audit_run(args.run_dir, rules=rules, out=args.out, compare_with=args.compare_with)
        for check in findings.rank(document["checks"]):
            print(gate.line(check))
        if args.junit:
            gate.write_junit(args.junit, document, args.fail_on)
        outcome["gate"] = gate.evaluate(document, args.fail_on)
        logger.info(outcome["gate"].message())
        where = (args.out or args.run_dir).rstrip("/")
        return f"{document['status']} {where}/{findings.FINDINGS}"

    status = run_command(PROG, parser(), audit, argv)
    if status == 0 and outcome.get("gate") is not None and outcome["gate"].tripped:
        return gate.EXIT_GATE
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
