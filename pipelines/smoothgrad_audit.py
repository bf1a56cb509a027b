"""smoothgrad-audit: TFRecord images → per-worker SmoothGrad → Parquet saliency corpus.

Usage::

    smoothgrad-audit --config configs/demo.yaml [--samples 50 ...] [beam options]
    python -m pipelines.smoothgrad_audit --config configs/local.yaml --runner DataflowRunner ...

The graph reads as a sentence of named steps: ReadRecords → BatchRecords →
Decode → SmoothGrad (Beam RunInference) → ToRows → WriteCorpus (Parquet shards,
errors, and ``_MANIFEST.json`` last). See docs/options.md for every option,
docs/output.md for the output schema, ARCHITECTURE.md for the modules.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions

from pipelines.audit import gate
from pipelines.audit.command import audit_after_run
from pipelines.run.baseline import Baseline, expected_device, fingerprint
from pipelines.run.baseline import resolve as resolve_baseline
from pipelines.run.command_line import parse_command
from pipelines.run.config import Config, ConfigError
from pipelines.run.lock import acquire as acquire_lock
from pipelines.run.plan import DEFAULT_RUNNER, Plan, check_run_dir, count_inputs, plan, prepare_run_dir
from pipelines.run.validate import check_run
from transforms.audit.aggregates import AuditAggregates, AuditSettings
from transforms.write import corpus
from transforms.write import schema as corpus_schema
from transforms.reuse.baseline import UseBaseline
from transforms.decode.decode import DecodeRecords, DecodeSettings
from transforms.support.errors import ERRORS
from transforms.explain.explain import ExplainSettings, SmoothGradModelHandler
from transforms.explain.explain_stages import ExplainInStages
from transforms.engine.device import CPU_KERNELS, request_cpu_kernels
from transforms.engine.noise import key_seed
from transforms.support.progress import Progress, ProgressSettings, ReportProgress
from transforms.read.records import ReadTFRecords
from transforms.rows.rows import RowSettings, ToRows
from transforms.explain.sanity import run_sanity_checks

# Named, not __name__: under ``python -m pipelines.smoothgrad_audit`` __name__ is "__main__", whose
# INFO lines the CLI would not show.
logger = logging.getLogger("pipelines.smoothgrad_audit")

DECODE_BATCH = 32


class WorkerKernelOptions(PipelineOptions):
    """``cpu_kernels`` as a pipeline option, so that it travels to every SDK worker with the job's options.

    A worker reads it from its ``PIPELINE_OPTIONS`` when ``transforms`` is imported, before TensorFlow
    (:func:`transforms.engine.device.apply_on_import`). The launcher sets it from the config.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--cpu_kernels", default=None, choices=CPU_KERNELS,
                            help="TensorFlow's CPU kernel library on the workers (set from the config).")


def build(pipeline: beam.Pipeline, config: Config, planned: Plan, run_dir: str, started_at: str,
          progress: ProgressSettings | None = None, baseline: Baseline | None = None, device: str | None = None):
    """Adds the named steps of the audit to ``pipeline``; returns the manifest PCollection.

    ``progress``: where the steps report records done (log lines while the run goes); None for none.
    ``baseline``: a checked baseline run whose rows unchanged records reuse; None to explain every record.
    ``device``: the kind of device the workers compute on, when the launcher can tell
    (:func:`pipelines.baseline.expected_device`); None: the workers check a baseline's device themselves.
    """
    info, target = planned.info, config.target
    parameters = dict(planned.engine.parameters())
    parameters.pop("jit_used"), parameters.pop("jit_reason")  # decided per worker
    parameters.update(jit_requested=config.jit, dtype=config.dtype, normalize=str(config.normalize),
                      downsample=config.downsample)
    audit = AuditSettings.for_maps(planned.map_shape, config.audit_samples, config.seed) if config.audit else None
    header = {
        "run_id": config.run_id, "started_at": started_at, "smoothgrad": parameters,
        "model": {"source": info.source, "weights": info.weights, "sha256": info.sha256,
                  "input_shape": list(info.input_shape), "classes": info.classes,
                  "scores_from": planned.engine.scores_from},
        "input": list(config.input),
        "config": config.as_dict(),
        "fingerprint": fingerprint(config, info, planned.engine.chunk, device),
        "baseline": {"run_id": baseline.run_id, "path": baseline.path, "device": baseline.device}
        if baseline else None,
        "audit": audit.manifest_block(config.downsample, planned.image_size) if audit else None,
    }
    mask_columns = bool(config.mask_feature)
    saliency_schema = corpus_schema.saliency_schema(planned.map_shape, config.dtype, mask_columns=mask_columns,
                                                    metadata={"run_id": config.run_id, **parameters,
                                                              "model": header["model"]})
    decode_settings = DecodeSettings.from_config(config, planned.image_size, planned.channels, info.classes)
    explain_settings = ExplainSettings(model=config.model, weights=config.weights,
                                       safe_mode=not config.unsafe_model_loading, engine=planned.engine_args,
                                       cpu_kernels=config.cpu_kernels)
    row_settings = RowSettings(dtype=config.dtype, normalize=config.normalize, downsample=config.downsample,
                               mask_columns=mask_columns)

    records, read_errors = pipeline | "ReadRecords" >> ReadTFRecords(config.input)
    if baseline is not None:
        to_explain, reread_errors, carried, outcomes = records | "Baseline" >> UseBaseline(
            baseline.parts, config.id_feature, device=baseline.device if device is None else None)
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
    engines_used = explained | "EngineUsed" >> beam.FlatMap(
        lambda result: [(result.jit_used, result.device)] if result.jit_used else [])
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
    written = (records, all_rows, errors, engines_used, sanity, outcomes)
    if audit is not None:  # class saliency and per-class samples into _audit/, listed in the manifest
        written += (all_rows | "AuditAggregates" >> AuditAggregates(run_dir, audit),)
    manifest = (written
                | "WriteCorpus" >> corpus.WriteCorpus(run_dir, saliency_schema, header, target.maps_per_record,
                                                      config.num_shards, mask_columns=mask_columns))
    if not config.audit:
        return manifest
    return manifest | "Audit" >> beam.Map(audit_after_run, run_dir)  # after the manifest: the corpus is complete


def run(argv=None, save_main_session=True, test_pipeline=None, wait=True):
    """Runs one audit; returns the Beam ``PipelineResult`` (None with ``--validate_only``).

    With ``--validate_only`` it only checks (:func:`pipelines.run.validate.check_run`)
    and returns None. ``wait=False`` returns once the job is submitted (a Flex
    Template launcher must not wait for the job).

    Raises :class:`ConfigError` (one line) for any mistake found before start.
    """
    command = parse_command(list(sys.argv[1:] if argv is None else argv))
    if command.validate_only:
        check_run(command.config, command.beam_args)
        return None
    return run_config(command.config, command.beam_args, save_main_session=save_main_session,
                      test_pipeline=test_pipeline, wait=wait)


def run_config(config: Config, beam_args=(), save_main_session=True, test_pipeline=None, wait=True):
    """Runs one audit from a validated :class:`Config` and Beam arguments (see :func:`run` for ``wait``).

    The run folder's lock (:mod:`pipelines.run.lock`) is taken before anything
    there is deleted or written, and released when the run ends, also when it
    fails; with ``wait=False``, once the job is submitted. A folder in use is a
    :class:`ConfigError` naming the holder.
    """
    started_at = corpus.now_utc()
    # Worker processes this one starts inherit the choice; a worker (this process too) whose TensorFlow was
    # imported with the other library says so when it loads the model, and its device kind records what it used.
    request_cpu_kernels(config.cpu_kernels)
    planned = plan(config)
    device = expected_device(beam_args, planned.engine, config.cpu_kernels)
    baseline = resolve_baseline(config, fingerprint(config, planned.info, planned.engine.chunk, device))
    run_dir, _ = check_run_dir(config)  # changes nothing
    run_lock = acquire_lock(run_dir, config.run_id, config.overwrite, beam_args)  # before anything there changes
    try:
        result = _run_locked(config, beam_args, planned, baseline, device, started_at, save_main_session,
                             test_pipeline, wait)
    finally:
        if run_lock is not None:
            run_lock.release()
    if not wait:
        return result
    manifest = _log_summary(run_dir)
    outcome = (manifest or {}).get("gate")
    if outcome and outcome["fail_on"] != "never":  # the audit's gate, recorded by the Audit step: the last line
        message = gate.Outcome(**{key: outcome[key] for key in ("fail_on", "status", "tripped", "failing")}).message()
        if outcome["tripped"]:
            logger.error(message)
            raise GateTripped(message, result)
        logger.info(message)
    return result


def _run_locked(config: Config, beam_args, planned: Plan, baseline, device, started_at: str, save_main_session,
                test_pipeline, wait):
    """Empties the run folder, builds the graph and runs it (the caller holds the folder's lock)."""
    run_dir = prepare_run_dir(config)
    options = PipelineOptions(list(beam_args))
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = DEFAULT_RUNNER
    options.view_as(SetupOptions).save_main_session = save_main_session
    options.view_as(WorkerKernelOptions).cpu_kernels = config.cpu_kernels  # read by SDK workers before TensorFlow
    pipeline = test_pipeline or beam.Pipeline(options=options)
    expected = count_inputs(config.input)
    progress = ProgressSettings(run_dir, config.progress_seconds, expected)
    build(pipeline, config, planned, run_dir, started_at, progress, baseline, device)
    logger.info("Writing the corpus to %s%s", run_dir, f" ({expected:,} input records)" if expected is not None else "")
    try:
        result = pipeline.run()
        if not wait:
            logger.info("Submitted (not waiting for the job): the corpus and its manifest will be in %s. The "
                        "run folder's lock is released now: the job itself holds none.", run_dir)
            return result
        result.wait_until_finish()
    finally:
        Progress.finish(run_dir)
    return result


class GateTripped(Exception):
    """The run finished and wrote everything, and its audit gate (``fail_on``) tripped: exit 3.

    Attributes:
        result: the Beam ``PipelineResult``.
    """

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


def _log_summary(run_dir: str) -> dict | None:
    manifest_path = FileSystems.join(run_dir, corpus.MANIFEST)
    if not FileSystems.exists(manifest_path):  # e.g. a runner that returns before the job ends
        logger.warning("No manifest in %s yet: the run is not complete.", run_dir)
        return None
    with FileSystems.open(manifest_path) as handle:
        manifest = json.loads(handle.read().decode("utf-8"))
    errors = ", ".join(f"{count} at {stage}" for stage, count in manifest["errors"].items() if count) or "none"
    reused = f", {manifest['records_reused']} reused" if manifest.get("baseline") else ""
    logger.info("Done: %d records read, %d explained%s, %d rows written, errors: %s. Corpus: %s",
                manifest["records_read"], manifest["records_explained"], reused, manifest["rows_written"], errors,
                run_dir)
    return manifest


_RESTARTED = "SMOOTHGRAD_AUDIT_RESTARTED_FOR_KERNELS"


def _restart_for_kernels(kernels: str) -> None:
    """Starts this command again in a fresh process when TensorFlow is loaded here with the other kernel library.

    TensorFlow reads its kernel choice once, when imported, and this module
    imports it; so ``cpu_kernels`` other than the library loaded here (e.g.
    ``eigen``, or ``onednn`` under an exported ``TF_ENABLE_ONEDNN_OPTS=0``)
    takes one restart of the command (a few seconds), with the variable set.
    Only the console command does this; a caller of :func:`run` keeps its process.
    """
    if request_cpu_kernels(kernels) is None or os.environ.get(_RESTARTED):
        return
    os.environ[_RESTARTED] = "1"
    logger.info("cpu_kernels: %s: starting the command again so that TensorFlow loads it.", kernels)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "pipelines.smoothgrad_audit", *sys.argv[1:]])


#: Sub-commands beside the default (running an audit): name → module with ``main(argv) -> int``.
SUBCOMMANDS = {"report": "pipelines.report.report", "compare": "pipelines.report.compare",
               "audit": "pipelines.audit.command", "history": "pipelines.report.history"}


def main(argv=None, wait=True) -> int:
    """Console entry point: one clear line and exit status 2 for user mistakes.

    ``smoothgrad-audit --config FILE [--key value ...]`` runs an audit
    (``--validate_only``: only checks it; ``wait=False``: returns once submitted);
    ``smoothgrad-audit report RUN_DIR``, ``smoothgrad-audit compare RUN_A RUN_B`` and
    ``smoothgrad-audit history OUTPUT`` (every completed run under OUTPUT) look at finished runs.
    """
    from_console = argv is None
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
        if from_console:
            _restart_for_kernels(parse_command(argv).config.cpu_kernels)
        run(argv, wait=wait)
    except ConfigError as error:
        print(f"smoothgrad-audit: error: {error}", file=sys.stderr)
        return 2
    except GateTripped:
        return gate.EXIT_GATE
    return 0


if __name__ == "__main__":
    sys.exit(main())
