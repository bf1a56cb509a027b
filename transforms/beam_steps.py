"""The Beam steps of the pipeline: read, decode, explain (SPEC §3).

Each step sends what it cannot handle to an ``errors`` output as a row of the
errors schema, so every input record ends as a saliency row or an error row.
The steps know nothing of gradients beyond calling the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from transforms import decode as decoding
from transforms import postprocess
from transforms.records import ReadError, Record, read_records, record_key

logger = logging.getLogger(__name__)
ERRORS = "errors"
ACCOUNTING = "accounting"
NAMESPACE = "smoothgrad_audit"


def error_row(key: str, source_file: str, record_index, stage: str, error: str) -> dict:
    """One row of the errors output."""
    return {"key": key, "source_file": source_file, "record_index": record_index,
            "stage": stage, "error": decoding.one_line(error)}


# ---------------------------------------------------------------- read
class _ReadFile(beam.DoFn):
    """Reads one TFRecord file; damage becomes error rows, never a failed job."""

    def __init__(self):
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.read_errors = Metrics.counter(NAMESPACE, "errors_read")

    def process(self, metadata):
        path = metadata.path
        try:
            handle = FileSystems.open(path, compression_type=CompressionTypes.AUTO)
        except Exception as error:  # noqa: BLE001 - an unreadable file is one error row
            self.read_errors.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(record_key(path, None), path, None, "read",
                                                              f"cannot open file: {error}"))
            return
        with handle:
            try:
                for item in read_records(handle, path):
                    if isinstance(item, Record):
                        self.records_read.inc()
                        yield item
                    else:
                        self.read_errors.inc()
                        yield beam.pvalue.TaggedOutput(ERRORS, self._row(item))
            except Exception as error:  # noqa: BLE001 - e.g. a bad gzip stream
                self.read_errors.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(record_key(path, None), path, None, "read",
                                                                  f"{type(error).__name__}: {error}"))

    @staticmethod
    def _row(item: ReadError) -> dict:
        return error_row(record_key(item.source_file, item.record_index), item.source_file,
                         item.record_index, "read", item.error)


class ReadTFRecords(beam.PTransform):
    """File patterns → :class:`Record` items (main output) and read errors (``errors``).

    Files are reshuffled before reading and records after, so a few large files
    still spread over all workers.
    """

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = list(patterns)

    def expand(self, pipeline):
        files = (pipeline
                 | "Patterns" >> beam.Create(self.patterns)
                 | "MatchFiles" >> fileio.MatchAll()
                 | "SpreadFiles" >> beam.Reshuffle())
        read = files | "ReadFiles" >> beam.ParDo(_ReadFile()).with_outputs(ERRORS, main="records")
        records = read.records | "SpreadRecords" >> beam.Reshuffle()
        return records, read[ERRORS]


# -------------------------------------------------------------- decode
class DecodeRecords(beam.DoFn):
    """Batches of :class:`Record` → :class:`decoding.Example` and decode errors."""

    def __init__(self, settings: decoding.DecodeSettings):
        self.settings = settings
        self.decoded = Metrics.counter(NAMESPACE, "records_decoded")
        self.failed = Metrics.counter(NAMESPACE, "errors_decode")

    def process(self, records):
        for item in decoding.decode_batch(list(records), self.settings):
            if isinstance(item, decoding.Failed):
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(item.key, item.source_file, item.record_index,
                                                                  "decode", item.error))
            else:
                self.decoded.inc()
                yield item


# ------------------------------------------------------------- explain
@dataclasses.dataclass(frozen=True)
class ExplainSettings:
    """What a worker needs to build its model and engine, and to shape rows."""

    model: str
    weights: str | None
    safe_mode: bool
    engine: dict                  # keyword arguments of SmoothGrad
    dtype: str = "float32"
    normalize: str = "none"
    downsample: int = 1
    mask_columns: bool = False

    def tag(self) -> str:
        text = json.dumps([self.model, self.weights, self.safe_mode, self.engine], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _WorkerEngine:
    """The per-process model and compiled engine (held by ``shared.Shared``)."""

    def __init__(self, settings: ExplainSettings):
        from transforms.models import load_model
        from transforms.smoothgrad import SmoothGrad

        started = time.time()
        self.model = load_model(settings.model, settings.weights, safe_mode=settings.safe_mode)
        self.engine = SmoothGrad(self.model, **settings.engine)
        self.lock = threading.Lock()
        self.load_reported = False
        logger.info("Loaded %s and built SmoothGrad (jit=%s) in %.1f s.", settings.model,
                    self.engine.jit_used, time.time() - started)


_SHARED = shared.Shared()


class ExplainBatches(beam.DoFn):
    """Batches of :class:`decoding.Example` → saliency rows; failures → error rows.

    The model is loaded once per worker process through ``shared.Shared`` and
    the SmoothGrad function is compiled once for the fixed batch size.
    """

    def __init__(self, settings: ExplainSettings):
        self.settings = settings
        self.explained = Metrics.counter(NAMESPACE, "records_explained")
        self.failed = Metrics.counter(NAMESPACE, "errors_explain")
        self.model_loads = Metrics.counter(NAMESPACE, "model_loads")
        self.compiles = Metrics.counter(NAMESPACE, "engine_compiles")
        self.latency = Metrics.distribution(NAMESPACE, "batch_latency_ms")
        self._worker = None

    def setup(self):
        self._worker = _SHARED.acquire(lambda: _WorkerEngine(self.settings), tag=self.settings.tag())

    def _explain(self, batch):
        worker = self._worker
        with worker.lock:
            if not worker.load_reported:  # metrics set in setup() are not reported
                worker.load_reported = True
                self.model_loads.inc()
            compiles_before = worker.engine.compile_count
            targets = None
            if worker.engine.target.mode == "label":
                targets = np.array([example.label for example in batch], np.int64)
            try:
                return worker.engine(np.stack([example.image for example in batch]),
                                     [example.key for example in batch], targets)
            finally:
                self.compiles.inc(worker.engine.compile_count - compiles_before)

    def process(self, batch):
        batch = list(batch)
        started = time.time()
        try:
            parts = [(batch, self._explain(batch))]
        except Exception as error:  # noqa: BLE001 - a failing batch must not kill the run
            logger.warning("SmoothGrad failed on a batch of %d (%s); retrying its records one by one.",
                           len(batch), error)
            parts = []
            for example in batch:  # isolate the record(s) at fault; the others are explained
                try:
                    parts.append(([example], self._explain([example])))
                except Exception as single_error:  # noqa: BLE001
                    self.failed.inc()
                    yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                        example.key, example.source_file, example.record_index, "explain",
                        f"SmoothGrad failed: {type(single_error).__name__}: {single_error}"))
        for examples, result in parts:
            yield from self._rows(examples, result)
        self.latency.update(int((time.time() - started) * 1000))
        yield beam.pvalue.TaggedOutput(ACCOUNTING, (f"jit:{self._worker.engine.jit_used}", ""))

    def _rows(self, batch, result):
        worker = self._worker
        topk = worker.engine.target.mode == "topk"
        for position, example in enumerate(batch):
            maps = result.maps[position] if topk else result.maps[position][None]
            if not np.all(np.isfinite(maps)):
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    example.key, example.source_file, example.record_index, "explain",
                    "saliency map has NaN or Inf values (non-finite gradients)"))
                continue
            if not self._fits_dtype(maps):
                self.failed.inc()
                yield beam.pvalue.TaggedOutput(ERRORS, error_row(
                    example.key, example.source_file, example.record_index, "explain",
                    "saliency values exceed the float16 range; use dtype float32 or a normalize option"))
                continue
            self.explained.inc()
            for rank in range(maps.shape[0]):
                yield self._row(example, result, position, rank if topk else None, maps[rank])

    def _row(self, example, result, position, rank, saliency) -> dict:
        def pick(values):
            return values[position] if rank is None else values[position][rank]

        row = {
            "key": example.key, "source_file": example.source_file, "record_index": example.record_index,
            "label": example.label, "target": int(pick(result.targets)),
            "target_rank": int(pick(result.target_ranks)), "score": float(pick(result.scores)),
            "predicted": int(result.predicted[position]), "noise_sigma": float(result.noise_sigma[position]),
            "_first": not rank,  # one row per record marks it explained (for the manifest)
        }
        if self.settings.mask_columns:
            inside, hit = (postprocess.mask_figures(saliency, example.mask)
                           if example.mask is not None else (None, None))
            row["mass_in_mask"], row["pointing_hit"] = inside, hit
        stored = postprocess.normalize(postprocess.downsample(saliency, self.settings.downsample),
                                       self.settings.normalize)
        row["height"], row["width"] = int(stored.shape[0]), int(stored.shape[1])
        row["saliency"] = stored.astype(np.float16 if self.settings.dtype == "float16" else np.float32)
        return row

    def _fits_dtype(self, saliency) -> bool:
        return self.settings.dtype != "float16" or self.settings.normalize != "none" or \
            float(np.max(np.abs(saliency))) < np.finfo(np.float16).max


def run_sanity_checks(examples, settings: ExplainSettings) -> dict:
    """Sanity checks (model randomisation, split-half convergence) on a sample of examples."""
    from transforms import sanity
    from transforms.models import load_model

    examples = sorted(examples, key=lambda example: example.key)
    if not examples:
        return {"records": 0}
    model = load_model(settings.model, settings.weights, safe_mode=settings.safe_mode)
    images = np.stack([example.image for example in examples])
    keys = [example.key for example in examples]
    engine_args = dict(settings.engine)
    if engine_args.get("target") == "label":
        engine_args["target"] = "top1"  # the checks compare maps of one fixed class per image
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        engine_args["jit"] = "graph"  # each cascade step is a new model: XLA compiles cost more than they save
    started = time.time()
    figures = {"records": len(keys), "keys": keys}
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # each randomised model is a new function: retracing is expected
    try:
        for name, check in (("convergence", sanity.convergence), ("randomisation", sanity.randomisation)):
            try:
                figures[name] = check(model, images, keys, **engine_args)
            except Exception as error:  # noqa: BLE001 - a failed check is reported, never fatal
                logger.warning("Sanity check %s failed: %s", name, error)
                figures[name] = {"error": decoding.one_line(f"{type(error).__name__}: {error}")}
    finally:
        tf_logger.setLevel(level)
    figures["seconds"] = round(time.time() - started, 1)
    return figures
