"""Flex Template entry point (``FLEX_TEMPLATE_PYTHON_PY_FILE`` in the Dockerfile).

Dataflow's template launcher runs ``python launch.py --name=value ...`` with the
template's parameters and the job's pipeline options. It launches the audit
and returns once the job is submitted: a Flex Template launcher must not wait
for the job to finish.
"""

import sys

from pipelines.smoothgrad_audit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], wait=False))
