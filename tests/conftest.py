"""Shared fixtures: a local Google Cloud Storage emulator for the gs:// tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

BUCKET = "smoothgrad-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with status {process.returncode}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the GCS emulator did not listen on port {port} within {seconds:.0f} s")


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://<bucket>`` on a local emulator (``gcp-storage-emulator``), for this test session.

    The emulator runs in memory on a free localhost port; ``STORAGE_EMULATOR_HOST``
    points Beam's GCS filesystem at it while the session lasts.
    """
    port = _free_port()
    environment = {key: value for key, value in os.environ.items() if key != "STORAGE_EMULATOR_HOST"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "localhost", "--port", str(port),
         "--in-memory", "--default-bucket", BUCKET],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_for(port, process)
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
