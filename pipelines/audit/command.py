"""The audit as the run's last step, and ``smoothgrad-audit audit RUN_DIR`` on a finished run.

As the last step of a run (``audit: true``) it runs where the pipeline runs
(the launcher's process on the local runner, a worker on Dataflow), after the
manifest is written: the corpus is complete whatever the audit finds. An
audit that cannot run does not lose the run: ``_FINDINGS.json`` then holds one
failing ``audit`` check that says why.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.audit import findings

logger = logging.getLogger(__name__)
PROG = "smoothgrad-audit audit"


def audit_after_run(manifest_path: str, run_dir: str) -> str:
    """The pipeline's ``Audit`` step: audits the run whose manifest was just written; returns the findings' path.

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
    return findings.FINDINGS


def parser() -> argparse.ArgumentParser:
    """The command line of ``smoothgrad-audit audit``."""
    from pipelines.report.report import OneLineParser

    command = OneLineParser(prog=PROG, description="Audits a finished run again (its corpus columns and the "
                            "_audit/ aggregates the run wrote; shortcut candidates are re-tested on the model) "
                            "and writes RUN_DIR/_FINDINGS.json.")
    command.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, OUTPUT/run_id=<RUN_ID> (local or gs://)")
    return command


def main(argv: list[str] | None = None) -> int:
    """``smoothgrad-audit audit RUN_DIR``: prints the findings' status and path; 2 and one line on a mistake."""
    from pipelines.audit.audit import audit_run
    from pipelines.report.report import run_command

    def audit(args):
        document = audit_run(args.run_dir)
        return f"{document['status']} {args.run_dir.rstrip('/')}/{findings.FINDINGS}"

    return run_command(PROG, parser(), audit, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
