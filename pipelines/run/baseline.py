"""Choosing and checking a baseline run on the launcher, before the pipeline starts.

``baseline: RUN_DIR`` names a completed run; ``baseline: latest`` the most
recently finished completed run under the same ``output`` folder (this run's
own folder excluded). A baseline is used only when its **fingerprint** (every
setting that decides a map, the model's and weights' hashes, the TensorFlow
and Keras versions, and the kind of device the maps were computed on: CPU
model, vector extensions and kernel library, or GPU model) equals this run's;
otherwise one log line names the fields that differ, with both values, and
every record is explained. When the workers run elsewhere (Dataflow) the
launcher cannot tell their device: each worker compares its own with the
baseline's and explains every record itself if they differ.

A named baseline that is missing, incomplete (no manifest), or whose listed
files are missing or unreadable is a configuration error, reported in one line
before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines.run.config import Config, ConfigError
from transforms.write import corpus
from transforms.support import storage

logger = logging.getLogger(__name__)

#: Config keys that decide a record's map or row (besides the model): part of the fingerprint.
MAP_KEYS = ("image_size", "resize_method", "preprocess", "image_feature", "label_feature", "id_feature",
            "raw_feature", "raw_shape", "mask_feature", "max_image_pixels",
            "samples", "target_reliability", "min_samples", "max_samples", "noise", "noise_mode", "variant", "reduce",
            "target", "logits", "batch_size", "chunk",
            "jit", "precision", "cpu_kernels", "seed", "dtype", "normalize", "downsample")
#: The keys of each method other than ``gradient`` that join the fingerprint (a ``gradient`` run's fingerprint
#: has none of them, as it had before methods existed, so older baselines stay usable).
METHOD_KEYS = {"integrated_gradients": ("method", "ig_steps", "ig_baseline"), "gradcam": ("method", "gradcam_layer")}


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A usable baseline run.

    Attributes:
        run_id: its run id.
        path: its run folder.
        parts: what the pipeline indexes: ``("saliency", shard, row_group)`` per
            row group and ``("errors", file, -1)`` per errors file.
        device: the kind of device its maps were computed on (None for a run
            made before this was recorded).
    """

    run_id: str
    path: str
    parts: tuple
    device: str | None = None


def fingerprint(config: Config, model_info, engine_chunk: int, device: str | None = None) -> dict:
    """Everything besides a record's bytes and key that decides its rows.

    Args:
        config: this run's configuration.
        model_info: the :class:`transforms.support.models.ModelInfo` of the model.
        engine_chunk: the chunk the engine resolved (a default chunk depends on the machine).
        device: the kind of device the maps are computed on
            (:func:`transforms.engine.device.device_kind`); None when the launcher
            cannot tell (workers elsewhere): the workers then check it, and the
            manifest records the kinds they reported.

    Returns:
        A flat JSON-able dict.
    """
    import keras
    import tensorflow as tf

    settings = config.as_dict()
    figures = {key: settings[key] for key in MAP_KEYS + METHOD_KEYS.get(config.method, ())}
    figures["chunk"] = engine_chunk
    weights = model_info.weights
    figures.update(
        model_sha256=model_info.sha256,
        model_source=None if model_info.sha256 else model_info.source,  # e.g. keras.applications:<Name>
        weights=weights if weights in (None, "imagenet") else storage.sha256(weights),
        tensorflow=tf.__version__, keras=keras.__version__, device=device)
    return json.loads(json.dumps(figures, default=str))  # as the manifest will hold it


#: Runners whose workers run on this machine (in this process, or in processes it starts with its environment).
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "PrismRunner")


def expected_device(beam_args, engine, cpu_kernels: str) -> str | None:
    """The kind of device this run's maps will be computed on, when the launcher can tell; else None.

    Args:
        beam_args: the Beam options of the run.
        engine: the launcher's :class:`transforms.smoothgrad.SmoothGrad` (built on this machine).
        cpu_kernels: the run's ``cpu_kernels``: the library of worker processes this one starts.

    Returns:
        For a runner whose workers run on this machine: its :func:`transforms.engine.device.device_kind`
        (in this process: the kernel library in effect here; in worker processes: ``cpu_kernels``).
        None for any other runner (Dataflow, a portable runner's remote workers).
    """
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    from transforms.engine.device import device_kind

    options = PipelineOptions(list(beam_args))
    runner = str(options.view_as(StandardOptions).runner or "FnApiRunner").rsplit(".", 1)[-1]
    if runner not in LOCAL_RUNNERS:
        return None
    if engine.device.startswith("gpu") or options.view_as(DirectOptions).direct_running_mode != "multi_processing":
        return engine.device
    return device_kind("CPU", cpu_kernels)


def _read_manifest(run_dir: str) -> dict | None:
    path = FileSystems.join(run_dir, corpus.MANIFEST)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _latest(output: str, own_run_id: str, before: str | None = None) -> str | None:
    """The most recently finished completed run under ``output`` but ``own_run_id`` (finished by ``before``)."""
    pattern = FileSystems.join(output.rstrip("/"), "run_id=*", corpus.MANIFEST)
    candidates = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        run_dir = FileSystems.split(metadata.path)[0]
        manifest = _read_manifest(run_dir)
        if manifest is None or manifest.get("run_id") == own_run_id:
            continue
        finished = manifest.get("finished_at") or manifest.get("started_at") or ""
        if before is None or finished <= before:
            candidates.append((finished, run_dir))
    return max(candidates)[1] if candidates else None


def _parts(run_dir: str, manifest: dict) -> tuple:
    parts = []
    for kind in ("saliency", "errors"):
        for name in manifest.get("outputs", {}).get(kind, []):
            path = FileSystems.join(run_dir, name)
            if not FileSystems.exists(path):
                raise ConfigError(f"config key 'baseline': {run_dir} lists {name}, which is missing; "
                                  "the baseline is damaged (run without it or repair it).")
            try:
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    metadata = pq.ParquetFile(handle).metadata
            except Exception as error:  # noqa: BLE001 - any unreadable footer is the same problem
                raise ConfigError(f"config key 'baseline': {path} is not a readable Parquet file "
                                  f"({type(error).__name__}); the baseline is damaged.") from None
            if "record_sha256" not in metadata.schema.names:
                raise ConfigError(f"config key 'baseline': {path} has no record_sha256 column "
                                  "(made by an older version); it cannot be reused.")
            if kind == "saliency":
                parts += [(kind, path, group) for group in range(metadata.num_row_groups)]
            else:
                parts.append((kind, path, -1))
    return tuple(parts)


def resolve(config: Config, run_fingerprint: dict) -> Baseline | None:
    """The baseline this run will reuse, or None.

    Raises:
        ConfigError: a named baseline is missing, incomplete or damaged, or is this run's own folder.
    """
    if not config.baseline:
        return None
    own = FileSystems.join(config.output.rstrip("/"), f"run_id={config.run_id}")
    if config.baseline == "latest":
        run_dir = _latest(config.output, config.run_id)
        if run_dir is None:
            logger.info("baseline: latest: no completed run under %s yet; explaining every record.", config.output)
            return None
    else:
        run_dir = config.baseline.rstrip("/")
        if run_dir == own.rstrip("/"):
            raise ConfigError(f"config key 'baseline': {run_dir} is this run's own folder, which the run "
                              "replaces; name an earlier run.")
    manifest = _read_manifest(run_dir)
    if manifest is None:
        state = "is incomplete (it has no _MANIFEST.json)" if storage.exists(run_dir) else "does not exist"
        raise ConfigError(f"config key 'baseline': {run_dir} {state}; name a completed run folder or 'latest'.")
    theirs = manifest.get("fingerprint") or {}
    unknown_here = {"device"} if run_fingerprint.get("device") is None else set()  # the workers check it
    differing = sorted(key for key in (set(theirs) | set(run_fingerprint)) - unknown_here
                       if theirs.get(key) != run_fingerprint.get(key))
    if differing:
        shown = ", ".join(f"{key} ({theirs.get(key)!r} there, {run_fingerprint.get(key)!r} here)"
                          for key in differing[:4]) + (", ..." if len(differing) > 4 else "")
        logger.warning("Baseline %s not used: its %s differ%s from this run's: %s. Explaining every record.",
                       run_dir, "fields" if len(differing) > 1 else "field", "" if len(differing) > 1 else "s",
                       shown)
        return None
    parts = _parts(run_dir, manifest)
    logger.info("Baseline %s (run %s): records with the same key and content reuse its rows.", run_dir,
                manifest.get("run_id"))
    return Baseline(run_id=str(manifest.get("run_id")), path=run_dir, parts=parts, device=theirs.get("device"))
