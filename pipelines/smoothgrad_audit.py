"""smoothgrad-audit: TFRecord images → per-worker SmoothGrad → Parquet saliency corpus.

Usage::

    smoothgrad-audit --config configs/demo.yaml [--samples 50 ...] [beam options]
    python -m pipelines.smoothgrad_audit --config configs/local.yaml --runner DataflowRunner ...

The graph reads as a sentence of named steps: ReadRecords → BatchRecords →
Decode → SmoothGrad (Beam RunInference) → ToRows → WriteCorpus (Parquet shards,
errors, and ``_MANIFEST.json`` last). See README.md for every option and the
output schema, ARCHITECTURE.md for the modules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from pipelines.run.baseline import Baseline, fingerprint
from pipelines.run.baseline import resolve as resolve_baseline
from pipelines.run.command_line import parse_command
from pipelines.run.config import Config, ConfigError
from transforms.write import corpus
from transforms.rows import postprocess
from transforms.support import storage
from transforms.write import schema as corpus_schema
from transforms.reuse.baseline import UseBaseline
from transforms.decode.decode import DecodeRecords, DecodeSettings
from transforms.support.errors import ERRORS
from transforms.explain.explain import ExplainSettings, SmoothGradModelHandler
from transforms.explain.explain_stages import ExplainInStages
from transforms.support.models import ModelError, ModelInfo, describe, load_model
from transforms.engine.noise import key_seed
from transforms.support.progress import Progress, ProgressSettings, ReportProgress
from transforms.read.records import ReadTFRecords, count_records
from transforms.rows.rows import RowSettings, ToRows
from transforms.explain.sanity import run_sanity_checks
from transforms.engine.smoothgrad import SmoothGrad

# Named, not __name__: under ``python -m pipelines.smoothgrad_audit`` __name__ is "__main__", whose
# INFO lines the CLI would not show.
logger = logging.getLogger("pipelines.smoothgrad_audit")

# Beam's DirectRunner first tries to download the Prism runner; without a
# --runner we use the in-process engine that DirectRunner falls back to.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
DECODE_BATCH = 32


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
    name prefix) no stale shard survives either.
    """
    run_dir, completed = check_run_dir(config)
    removed = storage.clear_folder(run_dir)
    if removed:
        logger.info("Removed %d file(s) of %s from %s.", removed,
                    "the completed run (overwrite)" if completed else "an incomplete earlier run", run_dir)
    if not storage.is_remote(run_dir):
        FileSystems.mkdirs(run_dir)
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
                       max_samples=config.max_samples)
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


def build(pipeline: beam.Pipeline, config: Config, planned: Plan, run_dir: str, started_at: str,
          progress: ProgressSettings | None = None, baseline: Baseline | None = None):
    """Adds the named steps of the audit to ``pipeline``; returns the manifest PCollection.

    ``progress``: where the steps report records done (log lines while the run goes); None for none.
    ``baseline``: a checked baseline run whose rows unchanged records reuse; None to explain every record.
    """
    info, target = planned.info, config.target
    parameters = dict(planned.engine.parameters())
    parameters.pop("jit_used"), parameters.pop("jit_reason")  # decided per worker
    parameters.update(jit_requested=config.jit, dtype=config.dtype, normalize=str(config.normalize),
                      downsample=config.downsample)
    header = {
        "run_id": config.run_id, "started_at": started_at, "smoothgrad": parameters,
        "model": {"source": info.source, "weights": info.weights, "sha256": info.sha256,
                  "input_shape": list(info.input_shape), "classes": info.classes,
                  "scores_from": planned.engine.scores_from},
        "input": list(config.input),
        "config": config.as_dict(),
        "fingerprint": fingerprint(config, info, planned.engine.chunk),
        "baseline": {"run_id": baseline.run_id, "path": baseline.path} if baseline else None,
    }
    mask_columns = bool(config.mask_feature)
    saliency_schema = corpus_schema.saliency_schema(planned.map_shape, config.dtype, mask_columns=mask_columns,
                                                    metadata={"run_id": config.run_id, **parameters,
                                                              "model": header["model"]})
    decode_settings = DecodeSettings.from_config(config, planned.image_size, planned.channels, info.classes)
    explain_settings = ExplainSettings(model=config.model, weights=config.weights,
                                       safe_mode=not config.unsafe_model_loading, engine=planned.engine_args)
    row_settings = RowSettings(dtype=config.dtype, normalize=config.normalize, downsample=config.downsample,
                               mask_columns=mask_columns)

    records, read_errors = pipeline | "ReadRecords" >> ReadTFRecords(config.input)
    if baseline is not None:
        to_explain, reread_errors, carried, outcomes = records | "Baseline" >> UseBaseline(baseline.parts,
                                                                                            config.id_feature)
        read_errors = (read_errors, reread_errors) | "ReadErrors" >> beam.Flatten()
    else:
        to_explain, carried = records, None
        outcomes = pipeline | "NoBaseline" >> beam.Create([])
    decoded = (to_explain
               | "BatchRecords" >> beam.BatchElements(min_batch_size=1, max_batch_size=DECODE_BATCH)
               | "Decode" >> beam.ParDo(DecodeRecords(decode_settings)).with_outputs(ERRORS, main="examples"))
    if planned.engine.adaptive is None:
        explained = decoded.examples | "SmoothGrad" >> RunInference(
            SmoothGradModelHandler(explain_settings, config.batch_size, model_copies=config.model_copies))
    else:  # samples: auto, one step per stage
        explained = decoded.examples | "SmoothGrad" >> ExplainInStages(
            explain_settings, config.batch_size, config.model_copies, planned.engine.adaptive.boundaries)
    rows = explained | "ToRows" >> beam.ParDo(ToRows(row_settings, progress)).with_outputs(ERRORS, main="rows")
    all_rows = rows.rows if carried is None else {"": rows.rows, "Reused": carried}  # written apart
    jit_used = explained | "JitUsed" >> beam.FlatMap(lambda result: [result.jit_used] if result.jit_used else [])
    errors = (read_errors, decoded[ERRORS], rows[ERRORS]) | "AllErrors" >> beam.Flatten()
    if progress is not None:
        _ = errors | "ProgressErrors" >> beam.ParDo(ReportProgress(progress, "error"))
        if baseline is not None:
            _ = (outcomes | "Reused" >> beam.Filter(lambda outcome: outcome == "reused")
                 | "ProgressReused" >> beam.ParDo(ReportProgress(progress, "reused")))
    if config.sanity_records:
        sanity = (decoded.examples
                  | "SanitySample" >> beam.combiners.Top.Of(
                      config.sanity_records, key=lambda example, seed=config.seed: key_seed(seed, example.key))
                  | "SanityChecks" >> beam.Map(run_sanity_checks, explain_settings))
    else:
        sanity = pipeline | "NoSanityChecks" >> beam.Create([])
    return ((records, all_rows, errors, jit_used, sanity, outcomes)
            | "WriteCorpus" >> corpus.WriteCorpus(run_dir, saliency_schema, header, target.maps_per_record,
                                                  config.num_shards, mask_columns=mask_columns))


def run(argv=None, save_main_session=True, test_pipeline=None, wait=True):
    """Runs one audit; returns the Beam ``PipelineResult`` (None with ``--validate_only``).

    With ``--validate_only`` it only checks (:func:`pipelines.validate.check_run`)
    and returns None. ``wait=False`` returns once the job is submitted (a Flex
    Template launcher must not wait for the job).

    Raises :class:`ConfigError` (one line) for any mistake found before start.
    """
    command = parse_command(list(sys.argv[1:] if argv is None else argv))
    if command.validate_only:
        from pipelines.run.validate import check_run

        check_run(command.config, command.beam_args)
        return None
    return run_config(command.config, command.beam_args, save_main_session=save_main_session,
                      test_pipeline=test_pipeline, wait=wait)


def run_config(config: Config, beam_args=(), save_main_session=True, test_pipeline=None, wait=True):
    """Runs one audit from a validated :class:`Config` and Beam arguments (see :func:`run` for ``wait``)."""
    started_at = corpus.now_utc()
    planned = plan(config)
    baseline = resolve_baseline(config, fingerprint(config, planned.info, planned.engine.chunk))
    run_dir = prepare_run_dir(config)
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
    options.view_as(SetupOptions).save_main_session = save_main_session
    pipeline = test_pipeline or beam.Pipeline(options=options)
    expected = count_inputs(config.input)
    progress = ProgressSettings(run_dir, config.progress_seconds, expected)
    build(pipeline, config, planned, run_dir, started_at, progress, baseline)
    logger.info("Writing the corpus to %s%s", run_dir, f" ({expected:,} input records)" if expected is not None else "")
    try:
        result = pipeline.run()
        if not wait:
            logger.info("Submitted (not waiting for the job): the corpus and its manifest will be in %s.", run_dir)
            return result
        result.wait_until_finish()
    finally:
        Progress.finish(run_dir)
    _log_summary(run_dir)
    return result


def _log_summary(run_dir: str) -> None:
    manifest_path = FileSystems.join(run_dir, corpus.MANIFEST)
    if not FileSystems.exists(manifest_path):  # e.g. a runner that returns before the job ends
        logger.warning("No manifest in %s yet: the run is not complete.", run_dir)
        return
    with FileSystems.open(manifest_path) as handle:
        manifest = json.loads(handle.read().decode("utf-8"))
    errors = ", ".join(f"{count} at {stage}" for stage, count in manifest["errors"].items() if count) or "none"
    reused = f", {manifest['records_reused']} reused" if manifest.get("baseline") else ""
    logger.info("Done: %d records read, %d explained%s, %d rows written, errors: %s. Corpus: %s",
                manifest["records_read"], manifest["records_explained"], reused, manifest["rows_written"], errors,
                run_dir)


#: Sub-commands beside the default (running an audit): name → module with ``main(argv) -> int``.
SUBCOMMANDS = {"report": "pipelines.report.report", "compare": "pipelines.report.compare"}


def main(argv=None, wait=True) -> int:
    """Console entry point: one clear line and exit status 2 for user mistakes.

    ``smoothgrad-audit --config FILE [--key value ...]`` runs an audit
    (``--validate_only``: only checks it; ``wait=False``: returns once submitted);
    ``smoothgrad-audit report RUN_DIR`` and ``smoothgrad-audit compare RUN_A RUN_B``
    look at finished runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
        logging.getLogger("pipelines").setLevel(logging.INFO)
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    # TensorFlow configures the root logger on import; the CLI owns the process, so
    # take it over: warnings from everyone, progress from this package.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    for name in ("pipelines", "transforms"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        run(argv, wait=wait)
    except ConfigError as error:
        print(f"smoothgrad-audit: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
