"""Both CPU kernel libraries: what is bit-stable, the device kind, and how ``cpu_kernels`` reaches every process.

TensorFlow runs its CPU kernels with oneDNN or with Eigen (``TF_ENABLE_ONEDNN_OPTS``,
read once when TensorFlow is imported), and XLA generates code for the CPU's
vector extensions. Each configuration runs in its own subprocess. Besides the
library this machine would use, each is also run with the vector extensions
capped at AVX2 (``ONEDNN_MAX_CPU_ISA``, ``--xla_cpu_max_isa``): the code paths
of CPUs without AVX-512 (AMD EPYC before Zen 4, older Intel), where Eigen's
kernels gave the clean score of a batch's last image other last bits.

The promise checked here, column by column, at every position of a batch:
every column but the map and its reliability is bit-identical (each image's
clean forward pass runs alone on a CPU); the map and its split-half
reliability come from the batched noisy pass, identical in every
configuration measured, but not so by construction, so they are compared
within :data:`MAP_ULPS` units in the last place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import helpers
from transforms.engine import device as device_module
from transforms.reuse.baseline import Decide, Seen, Stored

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAP_ULPS = helpers.MAP_ULPS
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
CONFIGURATIONS = {
    "eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "eigen-avx2": {"TF_ENABLE_ONEDNN_OPTS": "0", **AVX2_CAP},
    "onednn-avx2": {"TF_ENABLE_ONEDNN_OPTS": "1", **AVX2_CAP},
}
#: Columns that must be bit-identical at every batch position; the others are within MAP_ULPS.
EXACT_COLUMNS = ("scores", "targets", "target_ranks", "predicted", "noise_sigma", "samples_used")


def _environment(extra: dict) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS", "PIPELINE_OPTIONS")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, environment.get("PYTHONPATH")]))
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    environment.update(extra)
    return environment


def _python(code_or_module: list, extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_module], cwd=REPO, env=_environment(extra),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_every_stored_column_is_the_same_at_every_batch_position(configuration):
    done = _python(["-m", "tests.position_probe"], CONFIGURATIONS[configuration])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["kernels"] == ("onednn" if CONFIGURATIONS[configuration]["TF_ENABLE_ONEDNN_OPTS"] == "1"
                                 else "eigen")
    assert report["device"].endswith(report["kernels"])
    for setting, columns in report["settings"].items():
        for column in EXACT_COLUMNS:
            if column in columns:
                assert columns[column]["identical"], (configuration, setting, column, columns[column])
        for column in ("maps", "reliability"):
            assert columns[column]["max_ulp"] <= MAP_ULPS, (configuration, setting, column, columns[column])
    assert {"maps", "scores", "predicted", "reliability"} <= set(report["settings"]["N=3"])


@pytest.mark.parametrize("configuration", ["eigen-avx2", "onednn-avx2"])
def test_reused_baseline_rows_equal_a_fresh_run_under_both_kernel_libraries(configuration):
    done = _python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_baseline.py", "-k",
                    "reused_rows_equal_a_fresh_run or other_kind_of_device"], CONFIGURATIONS[configuration])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


def test_device_kind_names_the_cpu_its_extensions_and_the_kernel_library():
    kind = device_module.device_kind("CPU", "eigen")
    assert kind.startswith("cpu ") and kind.endswith("] eigen") and "[" in kind
    assert device_module.device_kind("CPU", "onednn").endswith("] onednn")
    assert device_module.current_device_kind() == device_module.device_kind(
        "CPU", device_module.cpu_kernels_in_effect())


def test_cpu_kernels_env_and_what_a_worker_reads_from_its_pipeline_options(tmp_path):
    assert device_module.cpu_kernels_env("eigen") == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert device_module.cpu_kernels_env("onednn") == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    with pytest.raises(ValueError, match="'cpu_kernels' must be one of"):
        device_module.cpu_kernels_env("mkl")
    read = device_module.requested_by_pipeline_options
    assert read({"PIPELINE_OPTIONS": json.dumps({"options": {"cpu_kernels": "eigen", "runner": "x"}})}) == "eigen"
    assert read({"PIPELINE_OPTIONS": json.dumps({"beam:option:cpu_kernels:v1": "onednn"})}) == "onednn"
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps({"options": {"cpu_kernels": "eigen"}}))
    assert read({"PIPELINE_OPTIONS_FILE": str(options_file)}) == "eigen"
    for unusable in ({}, {"PIPELINE_OPTIONS": "not json"}, {"PIPELINE_OPTIONS": json.dumps({"options": {}})},
                     {"PIPELINE_OPTIONS": json.dumps({"options": {"cpu_kernels": "mkl"}})}):
        assert read(unusable) is None


@pytest.mark.parametrize("extra, expected", [
    ({}, "onednn"),                                   # nothing said: the default
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "eigen"),        # an explicit variable is kept
    ({"TF_ENABLE_ONEDNN_OPTS": "0",                   # a worker's pipeline option wins
      "PIPELINE_OPTIONS": json.dumps({"options": {"cpu_kernels": "onednn"}})}, "onednn"),
    ({"PIPELINE_OPTIONS": json.dumps({"options": {"cpu_kernels": "eigen"}})}, "eigen"),
])
def test_importing_transforms_before_tensorflow_chooses_the_library(extra, expected):
    code = ("import transforms, sys; assert 'tensorflow' not in sys.modules\n"
            "from transforms.engine.device import cpu_kernels_in_effect; print(cpu_kernels_in_effect())")
    done = _python(["-c", code], extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == expected


def test_a_request_after_tensorflow_is_imported_says_what_is_in_effect():
    code = ("import os, tensorflow\nfrom transforms.engine.device import request_cpu_kernels\n"
            "print(request_cpu_kernels('onednn'), request_cpu_kernels('eigen'), os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    done = _python(["-c", code], {"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["eigen", "None", "0"]


def _decide(device):
    decide = Decide(device)
    decide.setup()
    seen = Seen("ab" * 32, "a.tfrecord", 3, 0)
    element = ("a.tfrecord:3", {"now": [seen], "then": [Stored("ab" * 32, "shard.parquet", 0, (5,))]})
    outputs = list(decide.process(element))
    return decide, [output.value for output in outputs if getattr(output, "tag", None) == "outcome"], outputs


def test_a_worker_on_another_kind_of_device_reuses_nothing_of_the_baseline(caplog):
    decide, outcomes, outputs = _decide(device_module.current_device_kind())
    assert not decide.other_device and outcomes == ["reused"]
    decide, outcomes, outputs = _decide("gpu Some Other GPU cc9.0")
    assert decide.other_device and outcomes == ["new"]
    assert isinstance(outputs[-1], Seen)  # explained here
    [line] = [record.getMessage() for record in caplog.records if "not reused on this worker" in record.getMessage()]
    assert "gpu Some Other GPU cc9.0" in line and device_module.current_device_kind() in line


def test_a_run_whose_rows_come_from_two_kinds_says_so(caplog):
    from transforms.write.corpus import record_devices

    manifest = {"devices_used": ["cpu x86_64 A [avx2] eigen"], "fingerprint": {"device": None}}
    record_devices(manifest)
    assert manifest["fingerprint"]["device"] == "cpu x86_64 A [avx2] eigen" and manifest["mixed_devices"] is False
    manifest = {"devices_used": ["cpu x86_64 A [avx2] eigen"], "records_reused": 3,
                "baseline": {"device": "cpu x86_64 A [avx2] onednn"}, "fingerprint": {}}
    record_devices(manifest)
    assert manifest["mixed_devices"] is True
    assert manifest["fingerprint"]["device"] == "cpu x86_64 A [avx2] eigen + cpu x86_64 A [avx2] onednn"
    assert any("2 kinds of device" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("kernels", ["eigen", "onednn"])
def test_the_command_computes_with_the_chosen_library(tmp_path, kernels):
    helpers.write_image_dataset(str(tmp_path / "data"), files=1, per_file=4, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(tmp_path), size=16, classes=3)
    other = "eigen" if kernels == "onednn" else "onednn"
    done = _python(["-m", "pipelines.smoothgrad_audit", "--input", str(tmp_path / "data" / "*.tfrecord"),
                    "--output", str(tmp_path / "out"), "--model", model, "--run_id", "k", "--samples", "2",
                    "--batch_size", "4", "--progress_seconds", "0", "--cpu_kernels", kernels],
                   device_module.cpu_kernels_env(other))  # the environment says the other one: the config wins
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "out" / "run_id=k" / "_MANIFEST.json") as handle:
        manifest = json.load(handle)
    assert manifest["config"]["cpu_kernels"] == kernels
    [used] = manifest["devices_used"]
    assert used.endswith(f"] {kernels}") and manifest["fingerprint"]["device"] == used
    assert manifest["fingerprint"]["cpu_kernels"] == kernels and manifest["mixed_devices"] is False


def test_an_unknown_library_is_one_line(tmp_path):
    done = _python(["-m", "pipelines.smoothgrad_audit", "--input", "x", "--output", str(tmp_path), "--model", "m",
                    "--cpu_kernels", "mkl"], {})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("smoothgrad-audit: error: config key 'cpu_kernels'")


def test_the_job_options_carry_cpu_kernels_to_sdk_workers_in_both_forms():
    """Dataflow hands a worker ``{"options": {...}}``, a portable job service ``{"beam:option:NAME:v1": ...}``."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from google.protobuf import json_format

    from pipelines.smoothgrad_audit import WorkerKernelOptions

    options = PipelineOptions(["--runner", "DataflowRunner"])
    options.view_as(WorkerKernelOptions).cpu_kernels = "eigen"
    all_options = options.get_all_options()
    dataflow_form = json.dumps({"options": all_options}, default=str)
    portable_form = json_format.MessageToJson(JobServiceHandle.encode_pipeline_options(all_options))
    for form in (dataflow_form, portable_form):
        assert device_module.requested_by_pipeline_options({"PIPELINE_OPTIONS": form}) == "eigen"
