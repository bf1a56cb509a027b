"""The audit on Beam's portable runner, the way Dataflow's Runner v2 runs it, offline.

A local job service and an external SDK worker pool run as separate processes;
the CLI submits the job with ``--runner PortableRunner --environment_type
EXTERNAL``, so every step is pickled, sent over the Fn API and run in a worker
process the pool starts. The corpus must equal the in-process runner's bit for
bit, and a second run with a baseline must reuse every row through the same path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipelines import smoothgrad_audit
from transforms.engine.device import cpu_kernels_in_effect
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["--samples", "4", "--noise", "0.2", "--batch_size", "4", "--progress_seconds", "0"]


def _environment() -> dict:
    """The services' and the CLI's environment: this interpreter's ``bin`` first, this checkout importable."""
    environment = dict(os.environ)
    environment["PATH"] = os.path.dirname(sys.executable) + os.pathsep + environment.get("PATH", "")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, environment.get("PYTHONPATH")]))
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # External workers import TensorFlow before they see the job's options: they start with the kernel library
    # this process computes with (an earlier in-process run may have exported the other one for its children).
    environment["TF_ENABLE_ONEDNN_OPTS"] = "1" if cpu_kernels_in_effect() == "onednn" else "0"
    return environment


def _stop(process: subprocess.Popen) -> None:
    """Stops a service and the workers it started (its own process group), by its id only."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    else:  # the service is gone; its workers may not be
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A Beam job service and an external worker pool on free localhost ports; stopped at the end."""
    logs = tmp_path_factory.mktemp("portable-services")
    ports = {"job": helpers.free_port(), "workers": helpers.free_port()}
    commands = {
        "job": [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                "--port", str(ports["job"])],
        "workers": [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                    "--service_port", str(ports["workers"])],
    }
    processes = {}
    try:
        for name, command in commands.items():
            with open(logs / f"{name}.log", "wb") as log:
                processes[name] = subprocess.Popen(command, env=_environment(), cwd=str(logs), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
        helpers.wait_for_port(ports["job"], processes["job"], "the Beam job service")
        helpers.wait_for_port(ports["workers"], processes["workers"], "the Beam worker pool")
        yield {"args": ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{ports['job']}",
                        "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{ports['workers']}"],
               "logs": logs}
    finally:
        for process in processes.values():
            _stop(process)


def _read(run_dir):
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        manifest = json.load(handle)
    paths = [os.path.join(run_dir, name) for name in manifest["outputs"]["saliency"]]
    return manifest, pq.read_table(paths, partitioning=None).sort_by("key")


def _comparable(manifest: dict) -> dict:
    """A manifest without what differs between two runs of the same job: times and the output folder."""
    manifest = json.loads(json.dumps(manifest))
    for key in ("started_at", "finished_at"):
        manifest.pop(key)
    manifest["config"].pop("output")
    return manifest


def _cli(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.smoothgrad_audit", *argv], cwd=cwd, env=_environment(),
                          capture_output=True, text=True, timeout=300)


def test_portable_runner_with_external_workers_equals_the_in_process_runner(services, tmp_path):
    paths = helpers.write_image_dataset(str(tmp_path / "data"), files=2, per_file=5, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)
    # the in-process run computes with the kernel library this process loaded: the workers use the same one
    common = ["--input", str(tmp_path / "data" / "*.tfrecord"), "--model", model, "--run_id", "audit", *SETTINGS,
              "--cpu_kernels", cpu_kernels_in_effect()]
    smoothgrad_audit.run([*common, "--output", str(tmp_path / "in-process")])
    reference_manifest, reference = _read(tmp_path / "in-process" / "run_id=audit")

    done = _cli([*common, "--output", str(tmp_path / "portable"), *services["args"]], cwd=str(tmp_path))
    logs = "".join(path.read_text(errors="replace")[-3000:] for path in sorted(services["logs"].iterdir()))
    assert done.returncode == 0, done.stderr[-3000:] + logs
    assert "Done: 10 records read, 10 explained, 10 rows written, errors: none." in done.stderr
    manifest, table = _read(tmp_path / "portable" / "run_id=audit")
    # the same rows, bit for bit, with the same Parquet metadata
    assert table.num_rows == 10 and table.equals(reference, check_metadata=True)
    assert manifest["invariant_holds"] is True and manifest["errors_total"] == 0
    assert set(manifest["files"]) == set(paths)
    assert manifest["records_read"] == manifest["records_explained"] + manifest["errors_total"] == 10
    assert _comparable(manifest) == _comparable(reference_manifest)
    # the audit's combiners, pickled and run on the external workers, give the same aggregates
    helpers.assert_same_audit(str(tmp_path / "portable" / "run_id=audit"), str(tmp_path / "in-process" / "run_id=audit"))

    # a scheduled run through the same path: the baseline's rows carried over by the key join
    again = _cli([*common, "--output", str(tmp_path / "portable"), "--run_id", "again", "--baseline", "latest",
                  *services["args"]], cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    manifest, table = _read(tmp_path / "portable" / "run_id=again")
    assert manifest["records_reused"] == 10 and manifest["records_explained"] == 0 and manifest["invariant_holds"]
    assert table.equals(reference)  # the same rows (metadata aside: another run_id)


def test_a_worker_pool_with_the_other_library_computes_with_it_and_the_manifest_says_so(services, tmp_path):
    """Beam's external worker pool runs every job's workers as threads of its own process, whose TensorFlow was
    imported by the first job: a job asking for the other library cannot change it there. Its maps are computed
    with what the pool has, the manifest's devices_used says which, and the pool's log says why."""
    helpers.write_image_dataset(str(tmp_path / "data"), files=1, per_file=4, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)
    used = {}
    for kernels in ("onednn", "eigen"):
        done = _cli(["--input", str(tmp_path / "data" / "*.tfrecord"), "--model", model, "--run_id", kernels,
                     "--output", str(tmp_path / "out"), "--cpu_kernels", kernels, *SETTINGS, *services["args"]],
                    cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr[-3000:]
        manifest, _ = _read(tmp_path / "out" / f"run_id={kernels}")
        [used[kernels]] = manifest["devices_used"]
        assert manifest["fingerprint"]["device"] == used[kernels] and manifest["config"]["cpu_kernels"] == kernels
    assert used["onednn"] == used["eigen"]  # one process, one library
    other = "eigen" if used["onednn"].endswith("] onednn") else "onednn"
    pool_log = (services["logs"] / "workers.log").read_text(errors="replace")
    assert f"cpu_kernels: {other} asked, but TensorFlow was imported in this worker process" in pool_log
