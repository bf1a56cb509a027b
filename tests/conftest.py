"""Shared fixtures: a local Google Cloud Storage emulator for the gs:// tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import helpers

BUCKET = "smoothgrad-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://<bucket>`` on a local emulator (``gcp-storage-emulator``), for this test session.

    The emulator runs in memory on a free localhost port; ``STORAGE_EMULATOR_HOST``
    points Beam's GCS filesystem at it while the session lasts. It runs with
    GCS's generation preconditions added (``tests/gcs_emulator.py``), which the
    run lock relies on.
    """
    port = helpers.free_port()
    environment = {key: value for key, value in os.environ.items() if key != "STORAGE_EMULATOR_HOST"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator", "start", "--host", "localhost", "--port", str(port),
         "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment, cwd=REPO)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        helpers.wait_for_port(port, process, "the GCS emulator")
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://localhost:{port}"
        yield f"gs://{BUCKET}"
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
