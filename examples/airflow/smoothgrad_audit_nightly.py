"""An Airflow DAG for a nightly smoothgrad-audit: run, gate, history.

Copy it into your DAGs folder and set ``CONFIG`` and ``OUTPUT``. Three tasks:

1. ``run``: the audit run of the night, reusing the rows of unchanged records
   (``--baseline latest``) and with the drift checks against the last run
   (``--compare_with latest``). It writes the corpus, ``_FINDINGS.json`` and the
   JUnit XML, and does not gate (``--fail_on never``): the task succeeds when
   the run is complete, whatever it found.
2. ``gate``: ``smoothgrad-audit audit RUN_DIR --fail_on fail`` reads the
   finished run again and exits 3 when a check fails, so the task, and the
   DAG run, fail where everyone sees them (and Airflow's alerting fires). With
   ``--runner DataflowRunner`` the run may return before the job ends; the gate
   then needs the job finished (``--wait`` in the Flex Template operator, or a
   sensor on the run's ``_MANIFEST.json``).
3. ``history``: the page of every night (``OUTPUT/_history/index.html``),
   drawn even when the gate failed.

The commands are plain strings (Airflow renders ``{{ ds_nodash }}``, the run's
logical date), so they run as they are in a shell too; the project's tests run
them locally on a small dataset.
"""

from __future__ import annotations

import datetime

CONFIG = "/opt/audits/nightly.yaml"          # the run config (input, model, ...), local or gs://
OUTPUT = "/data/audits"                      # the config's output folder, local or gs://
RUN_ID = "nightly-{{ ds_nodash }}"

RUN = (f"smoothgrad-audit --config {CONFIG} --output {OUTPUT} --run_id {RUN_ID} "
       f"--baseline latest --compare_with latest --fail_on never --junit {OUTPUT}/junit/{RUN_ID}.xml")
GATE = f"smoothgrad-audit audit {OUTPUT}/run_id={RUN_ID} --fail_on fail --out {OUTPUT}/gate/{RUN_ID}"
HISTORY = f"smoothgrad-audit history {OUTPUT}"

try:
    from airflow import DAG
    from airflow.operators.bash import BashOperator
except ImportError:  # the commands above stay importable without Airflow
    DAG = None

if DAG is not None:
    with DAG(dag_id="smoothgrad_audit_nightly", schedule="0 2 * * *", catchup=False,
             start_date=datetime.datetime(2026, 1, 1), max_active_runs=1,
             default_args={"retries": 1, "retry_delay": datetime.timedelta(minutes=10)}) as dag:
        run = BashOperator(task_id="run", bash_command=RUN)
        gate = BashOperator(task_id="gate", bash_command=GATE)
        history = BashOperator(task_id="history", bash_command=HISTORY, trigger_rule="all_done")
        run >> gate >> history
