"""``--validate_only``: every check a run makes before it starts, and one image explained, without running.

The checks go cheapest first, so a missing cloud option is reported before a
model is loaded:

1. the Beam options for the chosen runner: with ``DataflowRunner``, the options
   it cannot start without (``project``, ``region``, ``temp_location``), paths
   its workers cannot read (local input, output, model, weights or baseline),
   and how the workers get this project (a container image or a setup file);
   then Beam's own option validator;
2. the input patterns match files, the model loads and every option fits it
   (:func:`pipelines.run.plan.plan`);
3. the run folder is free (or ``overwrite`` is on), no live run holds its lock
   (read, never taken: :func:`pipelines.run.lock.check`), and the baseline resolves;
4. one image (the first record of the first input file that decodes, else a
   zero image) explained on the CPU with the run's settings at batch size 1.

Nothing is written: no run folder is created, no job is submitted. A problem
is a :class:`~pipelines.run.config.ConfigError` (one line, exit status 2); a valid
run logs one line with the figures of the explained image.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions,
                                                  StandardOptions, TestOptions, WorkerOptions)

from pipelines.run.config import Config, ConfigError
from transforms.support import storage
from transforms.support.errors import one_line

logger = logging.getLogger(__name__)

#: Runners that run on the Dataflow service.
DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
#: What DataflowRunner cannot start without, by Beam's option names (``GoogleCloudOptions``).
DATAFLOW_REQUIRED = ("project", "region", "temp_location")
#: Records of the first input file tried for the explained image.
FIRST_RECORDS = 8


def _runner(options: PipelineOptions):
    """The runner the options choose (the CLI's default when none), as an instance."""
    from apache_beam.runners.runner import create_runner

    from pipelines.run.plan import DEFAULT_RUNNER

    name = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    try:
        return create_runner(name)
    except ImportError as error:
        raise ConfigError(f"--runner {name}: cannot be loaded ({error}).") from None
    except (ValueError, AttributeError) as error:
        raise ConfigError(f"--runner {name}: {error}") from None


def _is_gcs(path) -> bool:
    return isinstance(path, str) and path.startswith("gs://")


def _default_region(runner) -> str | None:
    """Where Beam would take a region from when ``--region`` is missing ($CLOUDSDK_COMPUTE_REGION, gcloud)."""
    return runner.get_default_gcp_region()


def dataflow_problems(config: Config, options: PipelineOptions, runner) -> list[str]:
    """What keeps a DataflowRunner job from starting or its workers from working (empty: nothing)."""
    cloud = options.view_as(GoogleCloudOptions)
    missing = []
    if not cloud.project:
        missing.append("--project")
    if not cloud.region and not _default_region(runner):
        missing.append("--region")
    if not (cloud.temp_location or _is_gcs(cloud.staging_location)):
        missing.append("--temp_location")
    problems = []
    if missing:
        problems.append(f"missing required option{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if cloud.temp_location and not _is_gcs(cloud.temp_location) and not _is_gcs(cloud.staging_location):
        problems.append(f"--temp_location must be a gs:// path; got {cloud.temp_location!r}")
    paths = [("input", pattern) for pattern in config.input] + [("output", config.output)]
    if not config.model.startswith("keras.applications:"):
        paths.append(("model", config.model))
    if config.weights not in (None, "imagenet"):
        paths.append(("weights", config.weights))
    if config.baseline not in (None, "latest"):
        paths.append(("baseline", config.baseline))
    for key, path in paths:
        if not storage.is_remote(path):
            problems.append(f"config key '{key}' is a local path that Dataflow workers cannot read ({path}); "
                            "give a gs:// path")
    setup = options.view_as(SetupOptions)
    image = options.view_as(WorkerOptions).sdk_container_image
    if not (image or setup.setup_file or setup.extra_packages):
        problems.append("the workers need this project's code: pass --sdk_container_image (the project's "
                        "Dockerfile) or --setup_file ./setup.py")
    return problems


def check_options(config: Config, beam_args) -> str:
    """Checks the Beam options for the chosen runner; returns the runner's name.

    Raises:
        ConfigError: one line naming every problem found.
    """
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    options = PipelineOptions(list(beam_args))
    runner = _runner(options)
    name = type(runner).__name__
    problems = dataflow_problems(config, options, runner) if name in DATAFLOW_RUNNERS else []
    if not problems and name not in DATAFLOW_RUNNERS:
        # Beam's own checks. Not for Dataflow: there they look up (or create) a staging bucket on
        # Google Cloud, which from a machine without access hangs for minutes; the checks above
        # cover what a Dataflow job needs to start.
        options.view_as(TestOptions).dry_run = True
        try:
            problems = [str(error).rstrip(".") for error in PipelineOptionsValidator(options, runner).validate()]
        except Exception as error:  # noqa: BLE001 - any failure of the check is one line too
            problems = [f"Beam could not check them: {type(error).__name__}: {one_line(error)}"]
    if problems:
        raise ConfigError(f"Beam options for {name}: " + "; ".join(problems) + ".")
    return name


def _first_example(config: Config, planned):
    """The first record of the first input file that decodes, as ``(Example, note)``; ``(None, note)`` if none.

    Raises:
        ConfigError: records were read but none decodes (the feature settings do not fit the data).
    """
    from transforms.decode.decode import DecodeSettings, Example, decode_batch
    from transforms.read.records import Record, read_records

    paths = [item.path for match in FileSystems.match(list(config.input)) for item in match.metadata_list]
    first = sorted(paths)[0]
    settings = DecodeSettings.from_config(config, planned.image_size, planned.channels, planned.info.classes)
    records, note = [], ""
    try:
        with FileSystems.open(first, compression_type=CompressionTypes.AUTO) as handle:
            for item in read_records(handle, first):
                if isinstance(item, Record):
                    records.append(item)
                    if len(records) == FIRST_RECORDS:
                        break
    except Exception as error:  # noqa: BLE001 - an unreadable file: the run would make it an error row
        note = f"{os.path.basename(first)} could not be read ({type(error).__name__}: {error})"
    if not records:
        return None, note or f"{os.path.basename(first)} has no readable record"
    decoded = decode_batch(records, settings)
    for item in decoded:
        if isinstance(item, Example):
            return item, ""
    raise ConfigError(f"none of the first {len(records)} records of {first} decodes ({decoded[0].error}); "
                      "check image_feature, raw_feature, raw_shape, label_feature and the target.")


def explain_one(config: Config, planned) -> dict:
    """Explains one image on the CPU with the run's settings at batch size 1; returns its figures."""
    import tensorflow as tf

    from transforms.engine.smoothgrad import SmoothGrad

    example, note = _first_example(config, planned)
    height, width = planned.image_size
    if example is None:
        image, key, label = np.zeros((height, width, planned.channels), np.float32), "zero-image", 0
    else:
        image, key, label = example.image, example.key, example.label
    args = dict(planned.engine_args, batch_size=1, jit="graph" if config.jit == "auto" else config.jit)
    targets = np.asarray([label if label is not None else 0]) if config.target.mode == "label" else None
    started = time.perf_counter()
    with tf.device("/CPU:0"):
        engine = SmoothGrad(planned.model, **args)
        result = engine(image[None], [key], targets)
    maps = np.asarray(result.maps)
    if not np.all(np.isfinite(maps)):
        raise ConfigError(f"the map of {key} holds NaN or Inf values: the model or the settings do not "
                          "give usable gradients.")
    largest = float(np.max(np.abs(maps)))
    if config.dtype == "float16" and largest > float(np.finfo(np.float16).max):
        raise ConfigError(f"config key 'dtype': the map of {key} reaches {largest:.3g}, beyond float16; "
                          "use float32 or a normalize setting.")
    return {"key": key, "zero_image": example is None, "note": note, "seconds": time.perf_counter() - started,
            "jit": engine.jit_used, "target": ",".join(str(int(t)) for t in np.asarray(result.targets).ravel()),
            "score": float(np.asarray(result.scores).ravel()[0]), "map_shape": list(maps.shape[1:]),
            "samples_used": int(result.samples_used[0]),
            "max_abs": largest}


def check_run(config: Config, beam_args=()) -> dict:
    """Runs every check of ``--validate_only`` and logs one line; returns the figures.

    Raises:
        ConfigError: the first problem found, in one line.
    """
    from pipelines.run.baseline import expected_device, fingerprint
    from pipelines.run.baseline import resolve as resolve_baseline
    from pipelines.run.lock import check as check_lock
    from pipelines.run.plan import check_run_dir, count_inputs, plan

    runner = check_options(config, beam_args)
    planned = plan(config)
    run_dir, completed = check_run_dir(config)
    check_lock(run_dir, config.overwrite, beam_args)  # a run now would be refused; no lock is taken
    device = expected_device(beam_args, planned.engine, config.cpu_kernels)
    baseline = resolve_baseline(config, fingerprint(config, planned.info, planned.engine.chunk, device))
    figures = explain_one(config, planned)
    files = sum(len(match.metadata_list) for match in FileSystems.match(list(config.input)))
    records = count_inputs(config.input)
    figures.update(runner=runner, files=files, records=records, run_dir=run_dir,
                   baseline=baseline.path if baseline else None)
    image = ("a zero image (" + figures["note"] + ")") if figures["zero_image"] else figures["key"]
    samples = f"auto: {figures['samples_used']}" if config.samples == "auto" else config.samples
    logger.info(
        "Valid, nothing run: runner %s; input %d file(s)%s; model %s (%s, %s classes); %s explained on CPU at "
        "batch size 1 in %.1f s (method %s, jit %s, N=%s, precision %s): target %s, score %.4g, map %s, max |map| %.3g; "
        "baseline %s; run folder %s%s.",
        runner, files, f", {records:,} records" if records is not None else "", config.model,
        "x".join(str(size) for size in planned.info.input_shape), planned.info.classes, image,
        figures["seconds"], planned.engine.method if not planned.engine.gradcam_layer
        else f"gradcam on {planned.engine.gradcam_layer}", figures["jit"], samples, config.precision, figures["target"], figures["score"],
        "x".join(str(size) for size in figures["map_shape"]), figures["max_abs"], figures["baseline"] or "none",
        run_dir, " (holds a completed run: overwrite is on)" if completed else "")
    return figures
