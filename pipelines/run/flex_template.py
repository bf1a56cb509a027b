"""The Dataflow Flex Template's ``metadata.json``, generated from the config fields.

One parameter per config key (its ``--help`` text as ``helpText``) and
``config`` (a YAML file on GCS, as ``--config``). Every parameter is optional,
as on the command line: ``input``, ``output`` and ``model`` may come from
``config``. The launcher passes each parameter as ``--name=value``, which the
CLI parses like any flag (booleans as ``--key=true|false``). The checked-in
file ``templates/flex/metadata.json`` is this module's output; a test keeps
them equal::

    python -m pipelines.run.flex_template > templates/flex/metadata.json
"""

from __future__ import annotations

import dataclasses
import json
import re

from pipelines.run.config import RUN_ID_PATTERN, Config, _as_bool, show_default

GCS = r"gs://[^,\s]+"
#: Parameters whose values have an obvious shape, by key (others get one from their parser, or none).
PATTERNS = {
    "config": rf"^{GCS}\.ya?ml$",
    "input": rf"^{GCS}(,{GCS})*$",
    "output": rf"^{GCS}$",
    "model": rf"^({GCS}|keras\.applications:[A-Za-z0-9_]+)$",
    "weights": rf"^(imagenet|{GCS})$",
    "baseline": rf"^(latest|{GCS})$",
    "run_id": rf"^{RUN_ID_PATTERN.pattern}$",
    "image_size": r"^[0-9]+([,x][0-9]+)?$",
    "samples": r"^(auto|[0-9]+)$",
    "raw_shape": r"^[0-9]+[,x][0-9]+[,x][0-9]+$",
    "preprocess": r"^(tf|torch|caffe|unit|none|keras\.applications\.[a-z_0-9]+)$",
    "target": r"^(top1|label|class:[0-9]+|topk:[0-9]+)$",
    "normalize": r"^(none|minmax|abs_minmax|percentile:[0-9]+(\.[0-9]+)?)$",
}
NUMBER = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"


def _pattern(field: dataclasses.Field) -> str | None:
    parse = field.metadata["parse"]
    if field.name in PATTERNS:
        return PATTERNS[field.name]
    if parse is _as_bool:
        return "^(true|false)$"
    if hasattr(parse, "choices"):
        return "^(" + "|".join(re.escape(choice) for choice in parse.choices) + ")$"
    if hasattr(parse, "whole_minimum"):
        return "^[0-9]+$" if parse.whole_minimum is not None and parse.whole_minimum >= 0 else "^-?[0-9]+$"
    if hasattr(parse, "number_minimum"):
        return NUMBER
    return None


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def parameter(field: dataclasses.Field) -> dict:
    """The template parameter of one config field."""
    help_text = field.metadata["help"]
    if field.default is not None:
        help_text += f" (default: {show_default(field.default)})"
    if field.metadata["required"]:
        help_text += " Required unless set in config."
    entry = {"name": field.name, "label": _label(field.name), "helpText": help_text, "isOptional": True}
    pattern = _pattern(field)
    if pattern:
        entry["regexes"] = [pattern]
    return entry


def metadata() -> dict:
    """The template's metadata: name, description and one parameter per CLI option of a run."""
    config = {"name": "config", "label": "Config file",
              "helpText": "A YAML file on GCS with a flat mapping of the keys below (and optionally beam_options); "
                          "parameters given here win over it.",
              "isOptional": True, "regexes": [PATTERNS["config"]]}
    return {
        "name": "smoothgrad-audit",
        "description": "SmoothGrad saliency corpus from TFRecord images: Parquet shards and _MANIFEST.json under "
                       "OUTPUT/run_id=<RUN_ID>/ (see the project's docs/running-at-scale.md).",
        "parameters": [config] + [parameter(field) for field in dataclasses.fields(Config)],
    }


def main() -> None:
    """Prints the metadata as JSON (the content of templates/flex/metadata.json)."""
    print(json.dumps(metadata(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
