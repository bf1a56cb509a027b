"""The run configuration: one typed object, validated once, before any worker starts.

A config comes from a flat YAML mapping (``--config FILE.yaml``) and command-line
flags of the same names (flags win). Every problem is reported as a
:class:`ConfigError` whose message is one line naming the key, what was given
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from typing import Any


from pipelines.audit.gate import GATES

from transforms.engine.device import CPU_KERNELS, DEFAULT_CPU_KERNELS
from transforms.rows.postprocess import Normalization
from transforms.decode.preprocess import PREPROCESS_MODES, Preprocessing
from transforms.engine.methods import DEFAULT_IG_STEPS, IG_BASELINES, METHODS
from transforms.engine.smoothgrad import JIT_MODES, NOISE_MODES, PRECISIONS, REDUCTIONS, VARIANTS, Target

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._=-]+")
RESIZE_METHODS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
DTYPES = ("float16", "float32")

#: The config file key holding Beam pipeline options (not a run setting).
BEAM_OPTIONS = "beam_options"


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line."""


def _fail(key: str, allowed: str, got: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {allowed}; got {got!r}.")


# ------------------------------------------------------------------ parsers
# Each parser takes (key, raw value) and returns the parsed value or raises ConfigError.
def _as_bool(key, value):
    """Parses a boolean config value (true/false, yes/no, 1/0); raises :class:`ConfigError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise _fail(key, "true or false", value)


def _whole(minimum=None):
    def parse(key, value):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        allowed = "a whole number" + (f" >= {minimum}" if minimum is not None else "")
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise _fail(key, allowed, value)
        return value
    parse.whole_minimum = minimum
    return parse


def _number(minimum=None):
    def parse(key, value):
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
    parse.number_minimum = minimum
    return parse


def _samples(key, value):
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _whole(1)(key, value)
    except ConfigError:
        raise _fail(key, "a whole number >= 1, or auto", value) from None


def _fraction(key, value):
    number = _number()(key, value)
    if not 0 < number < 1:
        raise _fail(key, "a number between 0 and 1 (exclusive)", value)
    return number


def _text(key, value):
    if not isinstance(value, str) or not value:
        raise _fail(key, "a non-empty string", value)
    return value


def _one_of(choices):
    def parse(key, value):
        if value not in choices:
            raise _fail(key, f"one of {choices}", value)
        return value
    parse.choices = tuple(choices)  # for generated parameter checks (Flex Template metadata)
    return parse


def _whole_list(*lengths):
    def parse(key, value):
        if isinstance(value, str):
            value = [part for part in re.split(r"[,x\s]+", value.strip()) if part]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or len(value) not in lengths:
            raise _fail(key, f"{' or '.join(str(n) for n in lengths)} whole numbers", value)
        return [_whole(1)(key, item) for item in value]
    return parse


def _image_size(key, value):
    size = _whole_list(1, 2)(key, value)
    return size * 2 if len(size) == 1 else size


def _patterns(key, value):
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) and p for p in value):
        raise _fail(key, "a file pattern or a list of file patterns", value)
    return list(value)


def _run_id(key, value):
    value = str(value)
    if not RUN_ID_PATTERN.fullmatch(value) or value in (".", ".."):
        raise _fail(key, "a folder name of characters A-Z a-z 0-9 . _ = - (no path separators)", value)
    return value


def _parsed(parse_text, allowed):
    """A parser from a ``parse(text)`` classmethod that raises ValueError."""
    def parse(key, value):
        try:
            return parse_text(value)
        except ValueError as error:
            raise ConfigError(f"config key '{key}': expected {allowed}; got {value!r}"
                              + ("" if "got" in str(error) else f" ({error})") + ".") from None
    return parse


def _preprocessing(key, value):
    try:
        return Preprocessing.parse(value)
    except ValueError as error:
        raise ConfigError(f"config key '{key}': {error}") from None


def _audit_rules(key, value):
    from pipelines.audit import rules

    try:
        if isinstance(value, str):
            return dict(rules.load_raw(value))
        rules.parse(value, source=f"config key '{key}'")
    except rules.RulesError as error:
        raise ConfigError(str(error)) from None
    return dict(value)


def _field(default, help_text: str, parse, required: bool = False):
    """A config field: its default, ``--help`` text and parser (None always allowed unless required)."""
    return dataclasses.field(default=default, metadata={"help": help_text, "parse": parse, "required": required})


@dataclasses.dataclass
class Config:
    """Every setting of a run, parsed (see ``smoothgrad-audit --help``).

    Values are held parsed: ``target`` is a :class:`~transforms.engine.targets.Target`,
    ``normalize`` a :class:`~transforms.rows.postprocess.Normalization`,
    ``preprocess`` a :class:`~transforms.decode.preprocess.Preprocessing`; their ``str``
    is the text form users write.
    """

    input: list = _field(None, "TFRecord file pattern(s): local paths or gs://, globs allowed; "
                               "a list in YAML, repeat the flag or separate with commas on the command line.",
                         _patterns, required=True)
    output: str = _field(None, "Folder that receives OUTPUT/run_id=<RUN_ID>/ (local or gs://).", _text,
                         required=True)
    run_id: str = _field(None, "Name of this run's folder (characters A-Z a-z 0-9 . _ = -); "
                               "default: the UTC start time, e.g. 20260101T120000Z.", _run_id)
    model: str = _field(None, "A .keras file (safe mode), a .h5 file, a SavedModel folder, "
                              "or keras.applications:<Name> (e.g. keras.applications:Xception).", _text,
                        required=True)
    weights: str = _field(None, "For keras.applications: 'imagenet', a weights file, or null for random "
                                "weights; for a model file: an optional .weights.h5 file to load on top.", _text)
    unsafe_model_loading: bool = _field(False, "Allow .keras files with Lambda layers or other code "
                                               "(turns Keras safe mode off). Only for models you trust.", _as_bool)
    image_size: list = _field(None, "Model input size H,W (or one number for square); "
                                    "default: read from the model.", _image_size)
    resize_method: str = _field("bilinear", f"Image resize method, one of {RESIZE_METHODS}.",
                                _one_of(RESIZE_METHODS))
    preprocess: Preprocessing = _field(Preprocessing("tf"), f"Input scaling, one of {PREPROCESS_MODES} or "
                                       "keras.applications.<module> (its preprocess_input).", _preprocessing)
    image_feature: str = _field("image/encoded", "Feature with the encoded image (JPEG/PNG/GIF/BMP bytes).", _text)
    label_feature: str = _field("image/class/label", "Int64 feature with the label (optional per record).", _text)
    id_feature: str = _field(None, "Bytes feature used as the record key; default key <file name>:<index>.", _text)
    raw_feature: str = _field(None, "Float feature holding the model input as a raw tensor (already "
                                    "preprocessed, no resize); used instead of image_feature when set.", _text)
    raw_shape: list = _field(None, "Shape H,W,C of raw_feature's tensor (default: the model input shape).",
                             _whole_list(3))
    mask_feature: str = _field(None, "Feature with an object mask PNG (non-zero = object); adds the "
                                     "mass_in_mask and pointing_hit columns.", _text)
    samples: int | str = _field(20, "N, noisy samples per image (all noisy); or auto: each image gets as many as "
                                    "its map needs to reach target_reliability, from min_samples to max_samples "
                                    "(the samples_used column says how many).", _samples)
    target_reliability: float = _field(0.95, "With samples: auto, an image stops when the estimated rank "
                                             "correlation of its map with its converged map reaches this "
                                             "(plus a margin that shrinks with the samples).", _fraction)
    min_samples: int = _field(8, "With samples: auto, the samples of the first stage (>= 2).", _whole(2))
    max_samples: int = _field(64, "With samples: auto, the most samples an image gets (>= min_samples).",
                              _whole(2))
    noise: float = _field(0.1, "Noise level sigma (>= 0); see noise_mode.", _number(0.0))
    noise_mode: str = _field("absolute", f"One of {NOISE_MODES}: sigma in model input units, or "
                                         "sigma x (max - min) of each preprocessed image.", _one_of(NOISE_MODES))
    variant: str = _field("smoothgrad", f"One of {VARIANTS}.", _one_of(VARIANTS))
    reduce: str = _field("mean_abs", f"Channel reduction, one of {REDUCTIONS}.", _one_of(REDUCTIONS))
    method: str = _field("gradient", f"What each noisy sample contributes, one of {METHODS}: the input gradient, "
                                     "integrated gradients from ig_baseline (ig_steps points per sample), or "
                                     "Grad-CAM on gradcam_layer; the variant averages it over the noisy samples.",
                         _one_of(METHODS))
    ig_steps: int = _field(DEFAULT_IG_STEPS, "With method: integrated_gradients, path points per noisy sample "
                                             "(>= 2; trapezoid rule).", _whole(2))
    ig_baseline: str = _field("black", f"With method: integrated_gradients, the baseline, one of {IG_BASELINES}: "
                                       "the black image through the run's preprocessing, uniform noise between "
                                       "black and white (seeded like the noise), or the image blurred.",
                              _one_of(IG_BASELINES))
    gradcam_layer: str = _field("auto", "With method: gradcam, the layer read: auto (the last layer with a "
                                        "spatial 4-D output before the global pooling or flatten, nested models "
                                        "searched) or a layer name.", _text)
    target: Target = _field(Target("top1"), "Class(es) to explain: top1, label, class:K or topk:K.",
                            _parsed(Target.parse, "top1, label, class:K or topk:K (K a whole number)"))
    logits: bool = _field(True, "Explain pre-softmax/sigmoid scores (true) or the outputs as they are.", _as_bool)
    batch_size: int = _field(8, "Images per compiled SmoothGrad step (the last batch is padded).", _whole(1))
    chunk: int = _field(None, "Noisy samples per image processed at once (memory bound); default: the "
                              "fewest chunks of at most 8 noisy images per step on a CPU (32 on a GPU), as small "
                              "as covers samples. "
                              "A chunk that does not divide samples is followed by a smaller remainder: "
                              "exactly samples gradients are computed.", _whole(1))
    jit: str = _field("auto", f"One of {JIT_MODES}: XLA, plain TF graph, or chosen by device and model.",
                      _one_of(JIT_MODES))
    precision: str = _field("float32", f"Model compute dtype, one of {PRECISIONS} (a mixed-precision clone "
                                       "of the model; noise, sums and maps stay float32).", _one_of(PRECISIONS))
    cpu_kernels: str = _field(DEFAULT_CPU_KERNELS,
                              f"TensorFlow's CPU kernel library, one of {CPU_KERNELS} (sets TF_ENABLE_ONEDNN_OPTS "
                              "before TensorFlow is imported, in the launcher and every worker). oneDNN measured "
                              "1.3-1.5x faster on ResNet50 and MobileNetV2 on x86 CPUs with and without AVX-512 "
                              "(eigen was faster on a tiny 64x64 CNN); the two round last bits differently.",
                              _one_of(CPU_KERNELS))
    seed: int = _field(0, "Global noise seed; an example's noise depends on (seed, key, sample).", _whole())
    dtype: str = _field("float32", f"Stored saliency dtype, one of {DTYPES} (float16 halves storage; "
                                   "raw maps outside its range become errors).", _one_of(DTYPES))
    normalize: Normalization = _field(Normalization("none"), "Map normalisation before storing: none, minmax, "
                                      "abs_minmax or percentile:P (0 < P <= 100).",
                                      _parsed(Normalization.parse,
                                              "none, minmax, abs_minmax or percentile:P with 0 < P <= 100"))
    downsample: int = _field(1, "Integer factor to average-pool stored maps by (1 = full resolution).", _whole(1))
    overwrite: bool = _field(False, "Replace a completed run with the same run_id.", _as_bool)
    max_image_pixels: int = _field(40_000_000, "Images with more pixels are sent to errors "
                                               "(decompression-bomb guard).", _whole(1))
    num_shards: int = _field(0, "Saliency Parquet shards (0 = let the runner decide: one file per bundle). "
                                "A fixed count makes Beam group every row, maps included, by its shard: "
                                "held in memory on the local runner, a shuffle on Dataflow.", _whole(0))
    sanity_records: int = _field(0, "Records (chosen by key hash) on which to run the sanity checks "
                                    "(model randomisation, split-half convergence) into the manifest; 0 = off.",
                                 _whole(0))
    model_copies: int = _field(None, "Models per machine shared by all its SDK worker processes (Beam "
                                     "RunInference model sharing; e.g. 1 for one model per GPU); "
                                     "null = one model per worker process.", _whole(1))
    baseline: str = _field(None, "A completed run folder, or 'latest' (the most recent completed run under output): "
                                 "records with the same key and content (record_sha256) reuse its rows when its "
                                 "settings fingerprint equals this run's; null = explain every record.", _text)
    progress_seconds: float = _field(10.0, "Seconds between two progress log lines (records done, rate, ETA) "
                                           "while the run goes; 0 = none.", _number(0))
    audit: bool = _field(True, "Audit the corpus after writing it: class saliency means and per-class samples of "
                               "pooled maps into the run folder's _audit/, then the checks (shortcut regions "
                               "confirmed by counterfactuals, strategy clusters, border attention, unconverged maps, "
                               "confident mistakes, error rate, class accuracy) into _FINDINGS.json.", _as_bool)
    audit_samples: int = _field(1000, "Maps per class kept for strategy clusters and shortcut members, chosen by "
                                      "key hash (uniform, deterministic with seed).", _whole(10))
    counterfactual_samples: int = _field(64, "Images per shortcut candidate (and as many of other classes) re-run "
                                             "with the region replaced or pasted, to confirm it.", _whole(4))
    audit_rules: dict = _field(None, "The audit's rules, overriding the defaults: a mapping of check names to "
                                     "{enabled, warn, fail, ignore_classes, ...} in YAML, or the path of a YAML file "
                                     "holding one (see docs/scheduled-audits.md for every check and default).",
                               _audit_rules)
    fail_on: str = _field("never", f"Audit gate, one of {GATES}: exit 3 (after writing everything) when a check "
                                   "reaches this status; never: findings only.", _one_of(GATES))
    compare_with: str = _field(None, "A completed run folder, or 'latest' (the most recent completed run under "
                                     "output): the drift checks compare this run's findings with it; null = the "
                                     "baseline when one is used, else no drift checks.", _text)
    junit: str = _field(None, "Also write the audit's checks as JUnit XML to this file (local or gs://), one test "
                              "case per check, for CI systems.", _text)

    @classmethod
    def keys(cls) -> list[str]:
        """The config keys, in the order ``--help`` lists them."""
        return [field.name for field in dataclasses.fields(cls)]

    def as_dict(self) -> dict:
        """The settings as plain values (parsed ones in their text form), for manifests."""
        plain = {}
        for key in self.keys():
            value = getattr(self, key)
            plain[key] = str(value) if isinstance(value, (Target, Normalization, Preprocessing)) else value
        return plain


def show_default(value) -> str:
    """A default as ``--help`` shows it (parsed values in their text form)."""
    return repr(str(value)) if isinstance(value, (Target, Normalization, Preprocessing)) else repr(value)


def validate(raw: dict) -> Config:
    """Builds a :class:`Config` from a flat mapping of raw values, or raises :class:`ConfigError`.

    Each key is parsed by its field's parser; None (YAML ``null``) keeps a
    field's default unless the key is required. Checks that involve several
    keys follow.
    """
    unknown = sorted(set(raw) - set(Config.keys()))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}'; allowed keys: {', '.join(Config.keys())}.")
    config = Config()
    for field in dataclasses.fields(Config):
        value = raw.get(field.name)
        if value is None and field.metadata["required"]:
            raise ConfigError(f"config key '{field.name}' is required"
                              + (": one or more TFRecord file patterns." if field.name == "input" else "."))
        if value is None and (field.default is None or field.name not in raw):
            continue
        if value is None and field.name in ("image_feature", "label_feature"):
            setattr(config, field.name, None)  # explicitly switched off
            continue
        setattr(config, field.name, field.metadata["parse"](field.name, value))
    if config.run_id is None:
        config.run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if config.image_feature is None and config.raw_feature is None:
        raise ConfigError("config key 'image_feature': needs a feature name unless 'raw_feature' is set.")
    if config.max_samples < config.min_samples:
        raise ConfigError(f"config key 'max_samples': expected a whole number >= min_samples "
                          f"({config.min_samples}); got {config.max_samples!r}.")
    for key in ("fail_on", "junit", "audit_rules", "compare_with"):
        if not config.audit and getattr(config, key) not in (None, "never"):
            raise ConfigError(f"config key '{key}': needs 'audit: true' (the audit makes the findings it reads); "
                              f"got {getattr(config, key)!r} with audit: false.")
    if config.target.mode == "label" and not config.label_feature:
        raise ConfigError("config key 'target': 'label' needs 'label_feature' to name the label feature.")
    return config


def load_yaml(path: str) -> dict:
    """Reads a config file: one flat YAML mapping."""
    from transforms.support.storage import read_yaml

    try:
        data = read_yaml(path, "--config")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold one flat mapping of keys to values; "
                          f"got a {type(data).__name__}.")
    return data
