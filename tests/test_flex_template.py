"""The Flex Template's metadata.json stays in sync with the config fields and the CLI parses its parameters."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import yaml

from pipelines.run import flex_template
from pipelines.run.command_line import parse_command
from pipelines.run.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METADATA = os.path.join(REPO, "templates", "flex", "metadata.json")


def _metadata() -> dict:
    with open(METADATA, encoding="utf-8") as handle:
        return json.load(handle)


def _text(value) -> str:
    """A value as a template parameter carries it (a string)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def test_one_parameter_per_config_key_and_config():
    names = [parameter["name"] for parameter in _metadata()["parameters"]]
    assert names == ["config", *Config.keys()]
    assert len(set(names)) == len(names)


def test_the_checked_in_file_is_the_generated_one():
    assert _metadata() == flex_template.metadata(), "run: python -m pipelines.run.flex_template > templates/flex/metadata.json"


def test_help_texts_and_patterns_fit_the_fields():
    parameters = {parameter["name"]: parameter for parameter in _metadata()["parameters"]}
    for field in dataclasses.fields(Config):
        parameter = parameters[field.name]
        assert parameter["helpText"].startswith(field.metadata["help"]) and parameter["label"]
        assert parameter["isOptional"] is True  # as on the command line: config may give any key
        assert set(parameter) <= {"name", "label", "helpText", "isOptional", "regexes"}
        for pattern in parameter.get("regexes", []):
            re.compile(pattern)
            if field.default is not None:  # the default, written as a parameter, passes the check
                assert re.fullmatch(pattern, _text(field.default)), (field.name, pattern, field.default)
    for name in ("samples", "noise", "variant", "jit", "precision", "overwrite", "model_copies", "target", "input"):
        assert parameters[name].get("regexes"), name


def test_the_dataflow_config_as_template_parameters_parses_like_the_file():
    with open(os.path.join(REPO, "configs", "dataflow.yaml"), encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    values.pop("beam_options")
    values.update(baseline="latest", run_id="nightly-20260101", overwrite=False, logits=True)
    patterns = {parameter["name"]: parameter.get("regexes", []) for parameter in _metadata()["parameters"]}
    argv = []
    for key, value in values.items():
        for pattern in patterns[key]:
            assert re.fullmatch(pattern, _text(value)), (key, pattern, value)
        argv.append(f"--{key}={_text(value)}")  # as the Flex Template launcher passes parameters
    from_parameters = parse_command(argv).config
    from_file = parse_command(["--config", os.path.join(REPO, "configs", "dataflow.yaml"), "--baseline", "latest",
                               "--run_id", "nightly-20260101"]).config
    assert from_parameters.as_dict() == from_file.as_dict()
    assert re.fullmatch(patterns["config"][0], "gs://bucket/configs/dataflow.yaml")
