"""--validate_only, Beam options in a config file, and ``--key=true|false`` flags."""

from __future__ import annotations

import logging
import os

import pytest

from pipelines import smoothgrad_audit
from pipelines.run.command_line import parse_command
from pipelines.run.config import ConfigError
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validate")
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=3, size=16, classes=3)
    return {"folder": folder, "pattern": str(folder / "data" / "*.tfrecord"),
            "model": helpers.save_tiny_cnn(str(folder), size=16, classes=3)}


@pytest.fixture
def no_gcloud_region(monkeypatch, tmp_path):
    """No default region from the environment or a gcloud configuration (Beam looks at both)."""
    monkeypatch.delenv("CLOUDSDK_COMPUTE_REGION", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


def _args(dataset, *extra):
    return ["--input", dataset["pattern"], "--output", str(dataset["folder"] / "out"), "--model", dataset["model"],
            "--samples", "4", "--batch_size", "4", "--run_id", "checked", *extra]


def _main(argv, capsys) -> tuple[int, str]:
    status = smoothgrad_audit.main(argv)
    return status, capsys.readouterr().err.strip()


def test_a_valid_run_explains_one_record_on_cpu_and_writes_nothing(dataset, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert smoothgrad_audit.run(_args(dataset, "--validate_only")) is None
    lines = [record.getMessage() for record in caplog.records if record.name == "pipelines.run.validate"]
    assert len(lines) == 1 and lines[0].startswith("Valid, nothing run: runner FnApiRunner; input 2 file(s), 6 records")
    assert "part-0.tfrecord:0 explained on CPU at batch size 1" in lines[0] and "map 16x16" in lines[0]
    assert not (dataset["folder"] / "out").exists()  # no run folder, nothing written


def test_validate_only_figures_and_the_run_it_checked(dataset):
    from pipelines.run.validate import check_run

    command = parse_command(_args(dataset, "--validate_only", "--target", "label"))
    assert command.validate_only
    figures = check_run(command.config, command.beam_args)
    assert figures["runner"] == "FnApiRunner" and figures["records"] == 6 and figures["files"] == 2
    assert figures["key"] == "part-0.tfrecord:0" and not figures["zero_image"] and figures["jit"] == "graph"
    assert figures["map_shape"] == [16, 16] and figures["max_abs"] > 0 and figures["baseline"] is None


def test_validate_only_with_samples_auto_says_how_many_samples_its_image_took(dataset, caplog):
    from pipelines.run.validate import check_run

    command = parse_command(_args(dataset, "--validate_only", "--samples", "auto", "--min_samples", "2",
                                  "--max_samples", "6"))
    with caplog.at_level(logging.INFO, logger="pipelines"):
        figures = check_run(command.config, command.beam_args)
    assert figures["samples_used"] in (2, 4, 6)
    assert f"N=auto: {figures['samples_used']}," in caplog.records[-1].getMessage()


@pytest.mark.parametrize("extra, message", [
    (["--input", "/nonexistent/*.tfrecord"], "matches no file"),
    (["--image_feature", "image/png"], "none of the first 3 records of"),
    (["--baseline", "/nonexistent/run_id=old"], "config key 'baseline'"),
    (["--target", "class:7"], "config key 'target'"),
    (["--runner", "PortableRunner", "--environment_type", "EXTERNAL"], "Beam options for PortableRunner"),
])
def test_problems_are_one_line_and_exit_2(dataset, capsys, extra, message):
    argv = _args(dataset, "--validate_only")
    if extra[0] == "--input":
        argv = ["--input", extra[1], *argv[2:]]
    else:
        argv += extra
    status, error = _main(argv, capsys)
    assert status == 2 and message in error and "\n" not in error, error
    assert not (dataset["folder"] / "out").exists()


def test_dataflow_config_names_the_missing_options(capsys, no_gcloud_region):
    status, error = _main(["--config", os.path.join(REPO, "configs", "dataflow.yaml"), "--validate_only"], capsys)
    assert status == 2 and "\n" not in error
    assert "Beam options for DataflowRunner: missing required options --project, --region." in error, error


def test_dataflow_names_every_missing_option_and_local_paths_in_one_line(dataset, capsys, no_gcloud_region):
    status, error = _main(_args(dataset, "--validate_only", "--runner", "DataflowRunner"), capsys)
    assert status == 2 and "\n" not in error
    assert "missing required options --project, --region, --temp_location" in error, error
    for key in ("input", "output", "model"):
        assert f"config key '{key}' is a local path" in error
    assert "--sdk_container_image" in error and "--setup_file" in error
    status, error = _main(_args(dataset, "--validate_only", "--runner", "DataflowRunner", "--project", "my-project",
                                "--temp_location", "gs://bucket/tmp", "--setup_file", "./setup.py"), capsys)
    assert status == 2 and "missing required option --region;" in error and "--project" not in error


def test_beam_options_in_a_config_file_and_flags_win(dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {dataset['pattern']}\noutput: {tmp_path / 'out'}\nmodel: {dataset['model']}\n"
                      "beam_options:\n  runner: DataflowRunner\n  max_num_workers: 8\n  save_main_session: true\n"
                      "  dataflow_service_options:\n    - a=1\n    - b=2\n  region: null\n")
    command = parse_command(["--config", str(config), "--max_num_workers", "3"])
    assert command.beam_args == ["--runner=DataflowRunner", "--max_num_workers=8", "--save_main_session",
                                 "--dataflow_service_options=a=1", "--dataflow_service_options=b=2",
                                 "--max_num_workers", "3"]
    from apache_beam.options.pipeline_options import PipelineOptions, WorkerOptions

    assert PipelineOptions(command.beam_args).view_as(WorkerOptions).max_num_workers == 3
    config.write_text(f"input: {dataset['pattern']}\noutput: out\nmodel: m.keras\nbeam_options:\n  max_workers: 8\n")
    with pytest.raises(ConfigError, match="config key 'beam_options': 'max_workers' is not a Beam pipeline option"):
        parse_command(["--config", str(config)])


def test_boolean_keys_take_a_value_as_flex_templates_pass_them(dataset):
    base = ["--input", dataset["pattern"], "--output", "out", "--model", "m.keras"]
    assert parse_command([*base, "--overwrite=true", "--logits=false"]).config.overwrite is True
    assert parse_command([*base, "--logits=false"]).config.logits is False
    assert parse_command([*base, "--unsafe-model-loading=yes"]).config.unsafe_model_loading is True
    assert parse_command([*base, "--no-overwrite"]).config.overwrite is False
    with pytest.raises(ConfigError, match="config key 'overwrite': expected true or false"):
        parse_command([*base, "--overwrite=maybe"])


def test_a_launcher_can_return_without_waiting(dataset, tmp_path, caplog):
    """What templates/flex/launch.py does (main(..., wait=False)); the in-process runner finishes anyway."""
    argv = ["--input", dataset["pattern"], "--output", str(tmp_path / "out"), "--model", dataset["model"],
            "--samples", "2", "--run_id", "submitted", "--progress_seconds", "0"]
    with caplog.at_level(logging.INFO, logger="pipelines"):
        assert smoothgrad_audit.run(argv, wait=False) is not None
    messages = [record.getMessage() for record in caplog.records if record.name == "pipelines.smoothgrad_audit"]
    assert any(message.startswith("Submitted (not waiting for the job)") for message in messages)
    assert not any(message.startswith("Done:") for message in messages)
