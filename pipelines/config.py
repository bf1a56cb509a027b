"""The run configuration: one typed object, validated once, before any worker starts.

A config comes from a flat YAML mapping (``--config FILE.yaml``) and command-line
flags of the same names (flags win). Every problem is reported as a
:class:`ConfigError` whose message is one line naming the key, what was given
and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import math
import re
from typing import Any

import yaml

from transforms.postprocess import parse_normalize
from transforms.preprocess import PREPROCESS_MODES, check_preprocess
from transforms.smoothgrad import JIT_MODES, NOISE_MODES, REDUCTIONS, VARIANTS, Target

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._=-]+")
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
DTYPES = ("float16", "float32")


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line."""


def _field(default, help_text: str, **extra):
    return dataclasses.field(default=default, metadata={"help": help_text, **extra})


@dataclasses.dataclass
class Config:
    """Every setting of a run. See ``smoothgrad-audit --help``."""

    input: list = _field(None, "TFRecord file pattern(s): local paths or gs://, globs allowed; "
                               "a list in YAML, repeat the flag or separate with commas on the command line.")
    output: str = _field(None, "Folder that receives OUTPUT/run_id=<RUN_ID>/ (local or gs://).")
    run_id: str = _field(None, "Name of this run's folder (characters A-Z a-z 0-9 . _ = -); "
                               "default: the UTC start time, e.g. 20260101T120000Z.")
    model: str = _field(None, "A .keras file (safe mode), a .h5 file, a SavedModel folder, "
                              "or keras.applications:<Name> (e.g. keras.applications:Xception).")
    weights: str = _field(None, "For keras.applications: 'imagenet', a weights file, or null for random "
                                "weights; for a model file: an optional .weights.h5 file to load on top.")
    unsafe_model_loading: bool = _field(False, "Allow .keras files with Lambda layers or other code "
                                               "(turns Keras safe mode off). Only for models you trust.")
    image_size: list = _field(None, "Model input size H,W (or one number for square); "
                                    "default: read from the model.")
    resize_method: str = _field("bilinear", f"Image resize method, one of {RESIZE_METHODS}.")
    preprocess: str = _field("tf", f"Input scaling, one of {PREPROCESS_MODES} or "
                                   "keras.applications.<module> (its preprocess_input).")
    image_feature: str = _field("image/encoded", "Feature with the encoded image (JPEG/PNG/GIF/BMP bytes).")
    label_feature: str = _field("image/class/label", "Int64 feature with the label (optional per record).")
    id_feature: str = _field(None, "Bytes feature used as the record key; default key <file name>:<index>.")
    raw_feature: str = _field(None, "Float feature holding the model input as a raw tensor (already "
                                    "preprocessed, no resize); used instead of image_feature when set.")
    raw_shape: list = _field(None, "Shape H,W,C of raw_feature's tensor (default: the model input shape).")
    mask_feature: str = _field(None, "Feature with an object mask PNG (non-zero = object); adds the "
                                     "mass_in_mask and pointing_hit columns.")
    samples: int = _field(20, "N, noisy samples per image (all noisy).")
    noise: float = _field(0.1, "Noise level sigma (>= 0); see noise_mode.")
    noise_mode: str = _field("absolute", f"One of {NOISE_MODES}: sigma in model input units, or "
                                         "sigma x (max - min) of each preprocessed image.")
    variant: str = _field("smoothgrad", f"One of {VARIANTS}.")
    reduce: str = _field("mean_abs", f"Channel reduction, one of {REDUCTIONS}.")
    target: str = _field("top1", "Class(es) to explain: top1, label, class:K or topk:K.")
    logits: bool = _field(True, "Explain pre-softmax/sigmoid scores (true) or the outputs as they are.")
    batch_size: int = _field(8, "Images per compiled SmoothGrad step (the last batch is padded).")
    chunk: int = _field(None, "Noisy samples per image processed at once (memory bound); "
                              "default about 32 noisy images per step.")
    jit: str = _field("auto", f"One of {JIT_MODES}: XLA, plain TF graph, or chosen by device and model.")
    seed: int = _field(0, "Global noise seed; an example's noise depends on (seed, key, sample).")
    dtype: str = _field("float32", f"Stored saliency dtype, one of {DTYPES} (float16 halves storage; "
                                      "raw maps outside its range become errors).")
    normalize: str = _field("none", "Map normalisation before storing: none, minmax, abs_minmax or "
                                    "percentile:P (0 < P <= 100).")
    downsample: int = _field(1, "Integer factor to average-pool stored maps by (1 = full resolution).")
    overwrite: bool = _field(False, "Replace a completed run with the same run_id.")
    max_image_pixels: int = _field(40_000_000, "Images with more pixels are sent to errors "
                                               "(decompression-bomb guard).")
    num_shards: int = _field(0, "Saliency Parquet shards (0 = let the runner decide).")
    sanity_records: int = _field(0, "Records (chosen by key hash) on which to run the sanity checks "
                                    "(model randomisation, split-half convergence) into the manifest; 0 = off.")

    @classmethod
    def keys(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]


def _fail(key: str, allowed: str, got: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {allowed}; got {got!r}.")


def _as_bool(key, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise _fail(key, "true or false", value)


def _as_int(key, value, minimum=None):
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, "a whole number" + (f" >= {minimum}" if minimum is not None else ""), value)
    if minimum is not None and value < minimum:
        raise _fail(key, f"a whole number >= {minimum}", value)
    return value


def _as_float(key, value, minimum=None):
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(key, "a number", value) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(key, "a finite number", value)
    if minimum is not None and value < minimum:
        raise _fail(key, f"a number >= {minimum}", value)
    return float(value)


def _as_str(key, value, allowed=None):
    if not isinstance(value, str) or not value:
        raise _fail(key, "a non-empty string" if allowed is None else f"one of {allowed}", value)
    if allowed is not None and value not in allowed:
        raise _fail(key, f"one of {allowed}", value)
    return value


def _as_int_list(key, value, length_options):
    if isinstance(value, str):
        value = [part for part in re.split(r"[,x\s]+", value.strip()) if part]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) not in length_options:
        raise _fail(key, f"{' or '.join(str(n) for n in length_options)} whole numbers", value)
    numbers = [_as_int(key, item, minimum=1) for item in value]
    return numbers


def validate(raw: dict) -> Config:
    """Builds a :class:`Config` from a flat mapping, or raises :class:`ConfigError`."""
    unknown = sorted(set(raw) - set(Config.keys()))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; allowed keys: {', '.join(Config.keys())}.")
    values = {key: value for key, value in raw.items()}
    config = Config()

    inputs = values.get("input")
    if inputs is None:
        raise ConfigError("config key 'input' is required: one or more TFRecord file patterns.")
    if isinstance(inputs, str):
        inputs = [part.strip() for part in inputs.split(",") if part.strip()]
    if not isinstance(inputs, (list, tuple)) or not inputs or not all(isinstance(p, str) and p for p in inputs):
        raise _fail("input", "a file pattern or a list of file patterns", values.get("input"))
    config.input = list(inputs)
    for key in ("output", "model"):
        if values.get(key) is None:
            raise ConfigError(f"config key '{key}' is required.")
        setattr(config, key, _as_str(key, values[key]))

    run_id = values.get("run_id")
    if run_id is None:
        run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = str(run_id)
    if not RUN_ID_PATTERN.fullmatch(run_id) or run_id in (".", ".."):
        raise _fail("run_id", "a folder name of characters A-Z a-z 0-9 . _ = - (no path separators)", run_id)
    config.run_id = run_id

    for key in ("weights", "id_feature", "raw_feature", "mask_feature"):
        if values.get(key) is not None:
            setattr(config, key, _as_str(key, values[key]))
    for key in ("image_feature", "label_feature"):
        if key in values:
            setattr(config, key, _as_str(key, values[key]) if values[key] is not None else None)
    if config.image_feature is None and config.raw_feature is None:
        raise ConfigError("config key 'image_feature': needs a feature name unless 'raw_feature' is set.")
    for key in ("unsafe_model_loading", "overwrite", "logits"):
        if key in values:
            setattr(config, key, _as_bool(key, values[key]))
    if values.get("image_size") is not None:
        size = _as_int_list("image_size", values["image_size"], (1, 2))
        config.image_size = size * 2 if len(size) == 1 else size
    if values.get("raw_shape") is not None:
        config.raw_shape = _as_int_list("raw_shape", values["raw_shape"], (3,))
    if "resize_method" in values:
        config.resize_method = _as_str("resize_method", values["resize_method"], RESIZE_METHODS)
    if "preprocess" in values:
        config.preprocess = _as_str("preprocess", values["preprocess"])
        try:
            check_preprocess(config.preprocess)
        except ValueError as error:
            raise ConfigError(f"config key 'preprocess': {error}") from None

    if "samples" in values:
        config.samples = _as_int("samples", values["samples"], minimum=1)
    if "noise" in values:
        config.noise = _as_float("noise", values["noise"], minimum=0.0)
    for key, allowed in (("noise_mode", NOISE_MODES), ("variant", VARIANTS), ("reduce", REDUCTIONS),
                         ("jit", JIT_MODES), ("dtype", DTYPES)):
        if key in values:
            setattr(config, key, _as_str(key, values[key], allowed))
    if "target" in values:
        try:
            config.target = str(Target.parse(values["target"]))
        except ValueError:
            raise _fail("target", "top1, label, class:K or topk:K (K a whole number)", values["target"]) from None
    if config.target == "label" and not config.label_feature:
        raise ConfigError("config key 'target': 'label' needs 'label_feature' to name the label feature.")
    if "batch_size" in values:
        config.batch_size = _as_int("batch_size", values["batch_size"], minimum=1)
    if values.get("chunk") is not None:
        config.chunk = _as_int("chunk", values["chunk"], minimum=1)
    if "seed" in values:
        config.seed = _as_int("seed", values["seed"])
    if "normalize" in values:
        config.normalize = _as_str("normalize", values["normalize"])
        try:
            parse_normalize(config.normalize)
        except ValueError:
            raise _fail("normalize", "none, minmax, abs_minmax or percentile:P with 0 < P <= 100",
                        config.normalize) from None
    if "downsample" in values:
        config.downsample = _as_int("downsample", values["downsample"], minimum=1)
    if "max_image_pixels" in values:
        config.max_image_pixels = _as_int("max_image_pixels", values["max_image_pixels"], minimum=1)
    if "sanity_records" in values:
        config.sanity_records = _as_int("sanity_records", values["sanity_records"], minimum=0)
    if "num_shards" in values:
        config.num_shards = _as_int("num_shards", values["num_shards"], minimum=0)
    return config


def load_yaml(path: str) -> dict:
    """Reads a config file: one flat YAML mapping."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as handle:
            data = yaml.safe_load(handle.read().decode("utf-8"))
    except (OSError, IOError) as error:
        raise ConfigError(f"--config: cannot read {path!r} ({type(error).__name__}: {error}).") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"--config: {path!r} is not valid YAML ({first}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold one flat mapping of keys to values; "
                          f"got a {type(data).__name__}.")
    return data


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def argument_parser() -> argparse.ArgumentParser:
    """The CLI's own options; anything it does not know goes on to Beam."""
    parser = _OneLineParser(
        prog="smoothgrad-audit",
        description="SmoothGrad saliency corpus from TFRecord images, on Apache Beam. Options come "
                    "from --config FILE.yaml and the flags below (flags win); any other flag "
                    "(--runner, --direct_num_workers, --project, --region, --temp_location, ...) "
                    "is passed to Beam. Without --runner, the in-process Beam runner is used.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file with a flat mapping of the keys below.")
    for field in dataclasses.fields(Config):
        help_text = field.metadata["help"] + f" (default: {field.default!r})"
        if field.type in ("bool", bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, help=help_text)
            if "_" in field.name:
                parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                                    action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
        elif field.name == "input":
            parser.add_argument("--input", action="extend", nargs="+", help=help_text)
        else:
            parser.add_argument(f"--{field.name}", help=help_text)
    return parser


def unknown_beam_arguments(beam_args: list[str]) -> list[str]:
    """The arguments that no Beam pipeline option (of any runner) accepts."""
    from apache_beam.options.pipeline_options import PipelineOptions

    captured = []
    PipelineOptions(beam_args).get_all_options(add_extra_args_fn=captured.append)
    return captured[0].parse_known_args(beam_args)[1]


def _reject_unknown(beam_args: list[str], parser: argparse.ArgumentParser) -> None:
    unknown = unknown_beam_arguments(beam_args)
    if not unknown:
        return
    first = unknown[0]
    ours = [option for action in parser._actions for option in action.option_strings]
    close = difflib.get_close_matches(first.split("=", 1)[0], ours, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    what = f"unknown option {first!r}" if first.startswith("-") else f"unexpected argument {first!r}"
    raise ConfigError(f"{what}: neither a smoothgrad-audit option (see --help) nor a Beam pipeline option.{hint}")


def parse(argv: list[str]) -> tuple[Config, list[str]]:
    """Parses the command line: returns the validated config and Beam's arguments."""
    parser = argument_parser()
    known, beam_args = parser.parse_known_args(argv)
    _reject_unknown(beam_args, parser)
    raw = load_yaml(known.config) if getattr(known, "config", None) else {}
    flags = {key: value for key, value in vars(known).items() if key != "config"}
    if "input" in flags:
        flags["input"] = [part.strip() for item in flags["input"] for part in item.split(",") if part.strip()]
    for key, value in flags.items():
        if isinstance(value, str) and value.lower() in ("null", "~"):
            flags[key] = None
    raw.update(flags)
    return validate(raw), beam_args
