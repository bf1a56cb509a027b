"""Checked on the launcher before a run starts: the inputs, the model, every option against it, the run folder.

Both a run (:mod:`pipelines.smoothgrad_audit`) and ``--validate_only``
(:mod:`pipelines.run.validate`) go through these checks, so they live apart
from either.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from apache_beam.io.filesystems import FileSystems

from pipelines.run.config import Config, ConfigError
from pipelines.run.lock import LOCK
from transforms.engine.methods import pixel_range
from transforms.engine.smoothgrad import SmoothGrad
from transforms.read.records import count_records
from transforms.rows import postprocess
from transforms.support import storage
from transforms.support.models import ModelError, ModelInfo, describe, load_model
from transforms.write import corpus

logger = logging.getLogger(__name__)

# Beam's DirectRunner first tries to download the Prism runner; without a
# --runner we use the in-process engine that DirectRunner falls back to.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def _check_inputs(config: Config) -> None:
    names = {}
    for pattern in config.input:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as error:  # noqa: BLE001 - bad scheme, no permission...
            raise ConfigError(f"config key 'input': cannot list {pattern!r} ({error}).") from None
        if not matched:
            raise ConfigError(f"config key 'input': pattern {pattern!r} matches no file.")
        for metadata in matched:
            names.setdefault(FileSystems.split(metadata.path)[1], set()).add(metadata.path)
    clashing = sorted(name for name, paths in names.items() if len(paths) > 1)
    if clashing and not config.id_feature:
        logger.warning("%d file names occur in several input folders (e.g. %s): their default keys "
                       "<file name>:<index> collide; set id_feature or rename the files.",
                       len(clashing), clashing[0])


def check_run_dir(config: Config) -> tuple[str, bool]:
    """Checks ``output`` without changing anything; returns the run folder and whether it holds a completed run.

    Raises :class:`ConfigError` when ``output`` is a file, or the folder holds a
    completed run and ``overwrite`` is off.
    """
    output = config.output.rstrip("/") or "/"
    if not storage.is_remote(output) and os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"config key 'output': {output!r} is a file; a folder is needed.")
    run_dir = FileSystems.join(output, f"run_id={config.run_id}")
    completed = FileSystems.exists(FileSystems.join(run_dir, corpus.MANIFEST))
    if completed and not config.overwrite:
        raise ConfigError(f"config key 'run_id': {run_dir} already holds a completed run; "
                          "choose another run_id or pass --overwrite.")
    return run_dir, completed


def prepare_run_dir(config: Config) -> str:
    """Checks ``output`` and returns an empty ``OUTPUT/run_id=<RUN_ID>`` folder.

    A folder with a manifest is a completed run: refused unless ``overwrite``.
    A folder without one is an interrupted run: cleaned up. Every file below the
    folder is deleted by name, so on an object store (where a folder is only a
    name prefix) no stale shard survives either. The caller holds the folder's
    lock (:mod:`pipelines.run.lock`) by then, so no other run is writing there;
    the lock itself is kept.
    """
    run_dir, completed = check_run_dir(config)
    removed = storage.clear_folder(run_dir, keep=(LOCK,))
    if removed:
        logger.info("Removed %d file(s) of %s from %s.", removed,
                    "the completed run (overwrite)" if completed else "an incomplete earlier run", run_dir)
    if not storage.is_remote(run_dir):
        os.makedirs(run_dir, exist_ok=True)  # it holds the lock already
    return run_dir


def _image_size(config: Config, input_shape: tuple) -> tuple[int, int]:
    height, width = input_shape[0], input_shape[1]
    if config.image_size:
        wanted = tuple(config.image_size)
        if height is not None and (height, width) != wanted:
            raise ConfigError(f"config key 'image_size': the model takes {height}x{width}; got "
                              f"{wanted[0]}x{wanted[1]}.")
        return wanted
    if height is None or width is None:
        raise ConfigError("config key 'image_size' is required: the model's input size is not fixed "
                          f"({input_shape}); give H,W.")
    return height, width


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything checked and derived on the launcher before the pipeline starts.

    Attributes:
        model: the loaded Keras model (launcher only; workers load their own).
        info: what the manifest records about the model.
        image_size: (H, W) of the model input.
        channels: C of the model input.
        engine_args: keyword arguments of :class:`SmoothGrad`, as workers get them.
        engine: the launcher's engine, built to check the options against the model.
        map_shape: the stored map's shape, ``(H, W)`` or ``(H, W, C)``.
    """

    model: Any
    info: ModelInfo
    image_size: tuple
    channels: int
    engine_args: dict
    engine: SmoothGrad
    map_shape: tuple


def plan(config: Config) -> Plan:
    """Checks the inputs, the model and every option against it; raises :class:`ConfigError` (one line)."""
    _check_inputs(config)
    try:
        model = load_model(config.model, config.weights, safe_mode=not config.unsafe_model_loading)
        info = describe(model, config.model, config.weights)
    except ModelError as error:
        raise ConfigError(f"config key 'model': {error}") from None
    height, width = _image_size(config, info.input_shape)
    channels = info.input_shape[2]
    if channels is None:
        raise ConfigError(f"config key 'model': the model's channel count is not fixed ({info.input_shape}).")
    engine_args = dict(samples=config.samples, noise=config.noise, noise_mode=config.noise_mode,
                       variant=config.variant, reduce=config.reduce, target=config.target,
                       batch_size=config.batch_size, chunk=config.chunk, jit=config.jit, seed=config.seed,
                       logits=config.logits, precision=config.precision,
                       target_reliability=config.target_reliability, min_samples=config.min_samples,
                       max_samples=config.max_samples, method=config.method, ig_steps=config.ig_steps,
                       ig_baseline=config.ig_baseline, gradcam_layer=config.gradcam_layer)
    if config.method == "integrated_gradients":  # a black (and a white) pixel in the model's input units
        engine_args["pixel_range"] = pixel_range(None if config.raw_feature else config.preprocess, channels)
    try:
        engine = SmoothGrad(model, **engine_args)
    except ValueError as error:
        raise ConfigError(f"SmoothGrad options: {error}") from None
    try:
        engine.check_model((height, width, channels))  # the target against the model's classes
    except ValueError as error:
        raise ConfigError(f"config key 'target': {error}") from None
    try:
        stored = postprocess.downsampled_size(height, width, config.downsample)
    except ValueError as error:
        raise ConfigError(f"config key 'downsample': {error}") from None
    map_shape = stored + ((channels,) if config.reduce == "none" else ())
    return Plan(model=model, info=info, image_size=(height, width), channels=channels, engine_args=engine_args,
                engine=engine, map_shape=tuple(map_shape))


def count_inputs(patterns: list[str]) -> int | None:
    """The number of input records when every input file is local and uncompressed, else None."""
    total = 0
    for match in FileSystems.match(list(patterns)):
        for metadata in match.metadata_list:
            count = count_records(metadata.path)
            if count is None:
                return None
            total += count
    return total
