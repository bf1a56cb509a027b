"""Writing the corpus: sharded Parquet, the errors files, and ``_MANIFEST.json`` last.

The manifest is written by one element after every shard is written (the
shards' file names are its side inputs), to a temporary name then renamed, so a
folder with a manifest always holds a complete run.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import platform
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquetBatched

from transforms.audit.pooling import AUDIT_DIR
from transforms.write import schema as corpus_schema

logger = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
#: The baseline join's outcomes counted in the manifest as ``records_<outcome>`` (reused is counted from rows).
BASELINE_OUTCOMES = ("new", "changed", "retried", "removed")


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of the software that made the corpus."""
    import apache_beam
    import keras
    import numpy
    import pyarrow
    import tensorflow

    return {"python": platform.python_version(), "tensorflow": tensorflow.__version__,
            "keras": keras.__version__, "apache_beam": apache_beam.__version__,
            "pyarrow": pyarrow.__version__, "numpy": numpy.__version__}


def summarise(counts: list, maps_per_record: int, engines_used=()) -> dict:
    """Totals and per-file figures for the manifest.

    Args:
        counts: ``((kind, source_file), count)`` pairs; kind is ``record``,
            ``explained``, ``reused`` (rows carried over from a baseline),
            ``rows``, ``error:<stage>`` or ``samples:<n>`` (records whose maps
            took n noisy samples).
        maps_per_record: rows per explained record.
        engines_used: ``(jit mode, device kind)`` of the engines that ran.

    Returns:
        The manifest's count fields, the invariant check and per-file figures.
    """
    per_file = collections.defaultdict(lambda: {"records_read": 0, "records_explained": 0, "records_reused": 0,
                                                "rows_written": 0,
                                                "errors": {stage: 0 for stage in corpus_schema.STAGES}})
    samples = collections.Counter()
    for (kind, source), count in counts:
        if kind.startswith("samples:"):
            samples[int(kind[8:])] += count
            continue
        entry = per_file[source]
        if kind.startswith("error:"):
            entry["errors"][kind[6:]] += count
            if kind == "error:read":  # the other failed records are counted as "record"
                entry["records_read"] += count
        elif kind == "record":
            entry["records_read"] += count
        elif kind == "explained":
            entry["records_explained"] += count
        elif kind == "reused":
            entry["records_reused"] += count
        elif kind == "rows":
            entry["rows_written"] += count
    def holds(entry):
        done = entry["records_explained"] + entry["records_reused"]
        return (entry["records_read"] == done + entry["errors_total"]
                and entry["rows_written"] == done * maps_per_record)

    for entry in per_file.values():
        entry["errors_total"] = sum(entry["errors"].values())
        entry["invariant_holds"] = holds(entry)
    totals = {
        "records_read": sum(entry["records_read"] for entry in per_file.values()),
        "records_explained": sum(entry["records_explained"] for entry in per_file.values()),
        "records_reused": sum(entry["records_reused"] for entry in per_file.values()),
        "rows_written": sum(entry["rows_written"] for entry in per_file.values()),
        "errors": {stage: sum(entry["errors"][stage] for entry in per_file.values())
                   for stage in corpus_schema.STAGES},
    }
    totals["errors_total"] = sum(totals["errors"].values())
    totals["maps_per_record"] = maps_per_record
    totals["invariant_holds"] = holds(totals) and all(entry["invariant_holds"] for entry in per_file.values())
    totals["jit_used"] = sorted({jit for jit, _ in engines_used})
    totals["devices_used"] = sorted({device for _, device in engines_used if device})
    totals["samples_used"] = samples_distribution(samples)
    totals["files"] = dict(sorted(per_file.items()))
    return totals


def samples_distribution(samples: dict) -> dict:
    """The ``samples_used`` figures of the manifest from ``{samples: records}``.

    Example:
        >>> samples_distribution({8: 3, 12: 1})
        {'records': 4, 'counts': {'8': 3, '12': 1}, 'mean': 9.0, 'min': 8, 'median': 8, 'p90': 12, 'max': 12}
    """
    records = sum(samples.values())
    if not records:
        return {"records": 0, "counts": {}, "mean": None, "min": None, "median": None, "p90": None, "max": None}
    ordered = sorted(samples.items())

    def quantile(share):
        seen = 0
        for value, count in ordered:
            seen += count
            if seen >= share * records:
                return value
        return ordered[-1][0]
    return {"records": records, "counts": {str(value): count for value, count in ordered},
            "mean": sum(value * count for value, count in ordered) / records,
            "min": ordered[0][0], "median": quantile(0.5), "p90": quantile(0.9), "max": ordered[-1][0]}


def record_devices(manifest: dict) -> None:
    """Puts the device kinds behind the run's rows into its fingerprint; warns when they are several.

    The explained rows' kinds are ``devices_used``; rows carried over from a
    baseline were computed on the baseline's kind. A fingerprint's ``device``
    is the one kind, or every kind joined by `` + `` (which no single-kind run
    matches, so such a run is never reused as a baseline).
    """
    kinds = set(manifest.get("devices_used") or ())
    baseline_device = (manifest.get("baseline") or {}).get("device")
    if manifest.get("records_reused") and baseline_device:
        kinds.add(baseline_device)
    fingerprint = manifest.setdefault("fingerprint", {})
    if kinds:
        fingerprint["device"] = " + ".join(sorted(kinds))
    manifest["mixed_devices"] = len(kinds) > 1
    if len(kinds) > 1:
        logger.warning("This run's maps come from %d kinds of device, whose last bits may differ: %s.",
                       len(kinds), "; ".join(sorted(kinds)))


class _WriteManifest(beam.DoFn):
    def __init__(self, run_dir: str, header: dict, maps_per_record: int):
        self.run_dir = run_dir
        self.header = header
        self.maps_per_record = maps_per_record

    def process(self, _, counts, engines_used, saliency_files, error_files, quality, sanity, outcomes,
                audit_files=()):
        manifest = dict(self.header)
        manifest.update(summarise(counts, self.maps_per_record, engines_used))
        record_devices(manifest)
        adaptive = self.header.get("smoothgrad", {}).get("adaptive")
        if adaptive and manifest["samples_used"]["records"]:
            used = manifest["samples_used"]
            stopped = sum(count for value, count in used["counts"].items() if int(value) < adaptive["max_samples"])
            used["reached_target_before_max"] = stopped / used["records"]
        if manifest.get("baseline"):
            found = dict(outcomes)
            manifest.update({f"records_{outcome}": found.get(outcome, 0) for outcome in BASELINE_OUTCOMES})
        if quality is not None:
            mass, hits, scored = quality
            variant = self.header.get("smoothgrad", {}).get("variant", "smoothgrad")
            manifest["quality"] = {variant: {
                "maps_with_mask": scored,
                "mass_in_mask_mean": mass / scored if scored else None,
                "pointing_rate": hits / scored if scored else None}}
        if sanity:
            manifest["sanity"] = sanity
        manifest["finished_at"] = now_utc()
        manifest["versions"] = versions()
        manifest["outputs"] = {"saliency": sorted(FileSystems.split(path)[1] for path in saliency_files),
                               "errors": sorted(FileSystems.split(path)[1] for path in error_files),
                               # the audit's files are one folder down: named relative to the run folder
                               "audit": sorted(f"{AUDIT_DIR}/{FileSystems.split(path)[1]}" for path in audit_files)}
        final = FileSystems.join(self.run_dir, MANIFEST)
        temporary = FileSystems.join(self.run_dir, f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with FileSystems.create(temporary) as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=False, default=str).encode("utf-8"))
        FileSystems.rename([temporary], [final])  # the run is complete only once this exists
        yield final


class _QualityTotals(beam.CombineFn):
    """Sums of mass_in_mask, pointing hits and maps with a mask."""

    def create_accumulator(self):
        return 0.0, 0, 0

    def add_input(self, totals, row):
        if row.get("mass_in_mask") is None:  # no mask on this record
            return totals
        return totals[0] + row["mass_in_mask"], totals[1] + int(row["pointing_hit"]), totals[2] + 1

    def merge_accumulators(self, accumulators):
        return tuple(map(sum, zip(*accumulators)))

    def extract_output(self, totals):
        return totals


class WriteCorpus(beam.PTransform):
    """Writes saliency rows, error rows and, last, the manifest into ``run_dir``.

    Args:
        run_dir: ``OUTPUT/run_id=<RUN_ID>``, already emptied by the launcher.
        saliency_schema: the Arrow schema of the saliency rows.
        header: manifest fields known at launch (run id, parameters, model...).
        maps_per_record: rows per explained record (K for ``topk:K``, else 1).
        num_shards: saliency shards (0: runner decides).
        mask_columns: whether rows carry mass_in_mask / pointing_hit (manifest quality means).

    The input is ``(records, rows, errors, engines_used, sanity, outcomes[, audit_files])``: the
    records read, the saliency rows (explained, or carried over from a baseline
    with ``_reused``), the error rows, the ``(jit mode, device kind)`` of the
    engines that ran (repeats allowed), at most one dict of sanity-check figures for the
    manifest, the baseline join's outcome per record (strings; none without
    a baseline), and optionally the paths of the files the audit aggregates
    wrote under ``_audit/`` (listed as the manifest's ``outputs.audit``).
    """

    def __init__(self, run_dir: str, saliency_schema, header: dict, maps_per_record: int, num_shards: int = 0,
                 mask_columns: bool = False):
        super().__init__()
        self.mask_columns = mask_columns
        self.run_dir = run_dir
        self.saliency_schema = saliency_schema
        self.header = header
        self.maps_per_record = maps_per_record
        self.num_shards = num_shards

    def expand(self, inputs):
        """Adds the write steps; returns the PCollection of the manifest's path."""
        records, rows, errors, engines_used, sanity, outcomes, *audit_files = inputs
        # Rows made in different stages (explained; carried over from a baseline) are written by a sink each,
        # in their own stage, so no flatten makes them cross a stage boundary.
        branches = rows if isinstance(rows, dict) else {"": rows}
        saliency_schema = self.saliency_schema
        saliency_files, counts, quality_parts = [], [], []
        for name, branch in branches.items():
            saliency_files.append(
                branch
                | f"SaliencyTables{name}" >> _Tables(lambda batch: corpus_schema.saliency_table(batch, saliency_schema),
                                                     corpus_schema.rows_per_group(saliency_schema))
                | f"WriteSaliency{name}" >> WriteToParquetBatched(
                    FileSystems.join(self.run_dir, "saliency" + (f"-{name.lower()}" if name else "")),
                    schema=saliency_schema, codec="zstd", file_name_suffix=".parquet", num_shards=self.num_shards))
            # Each branch is counted per (kind, file) where it is produced (Beam lifts the count into the
            # producing stage), so only per-file totals cross into the manifest's side input, never one
            # element per record.
            counts += [
                branch | f"CountRows{name}" >> beam.Map(lambda row: ("rows", row["source_file"]))
                       | f"RowsPerFile{name}" >> beam.combiners.Count.PerElement(),
                branch | f"FirstRows{name}" >> beam.Filter(lambda row: row["_first"])
                       | f"CountExplained{name}" >> beam.FlatMap(
                           lambda row: [("reused" if row.get("_reused") else "explained", row["source_file"]),
                                        (f"samples:{row['samples_used']}", row["source_file"])])
                       | f"ExplainedPerFile{name}" >> beam.combiners.Count.PerElement()]
            if self.mask_columns:
                quality_parts.append(branch | f"QualityTotals{name}" >> beam.CombineGlobally(_QualityTotals()))
        error_files = (
            errors
            | "ErrorTables" >> _Tables(corpus_schema.errors_table, 50_000)
            | "WriteErrors" >> WriteToParquetBatched(
                FileSystems.join(self.run_dir, "errors"), schema=corpus_schema.ERRORS_SCHEMA, codec="zstd",
                file_name_suffix=".parquet"))
        counted = (
            [records | "CountRecords" >> beam.Map(lambda record: ("record", record.source_file))
                     | "RecordsPerFile" >> beam.combiners.Count.PerElement(),
             errors | "CountErrors" >> beam.Map(lambda row: (f"error:{row['stage']}", row["source_file"]))
                    | "ErrorsPerFile" >> beam.combiners.Count.PerElement()] + counts
            | "AllCounts" >> beam.Flatten())
        if not quality_parts:
            quality = records.pipeline | "NoQuality" >> beam.Create([None])
        elif len(quality_parts) == 1:
            quality = quality_parts[0]
        else:
            quality = (quality_parts | "QualityParts" >> beam.Flatten()
                       | "QualitySum" >> beam.CombineGlobally(lambda parts: tuple(map(sum, zip(*parts))) or (0.0, 0, 0)))
        saliency_files = saliency_files[0] if len(saliency_files) == 1 \
            else saliency_files | "SaliencyFiles" >> beam.Flatten()
        return (
            records.pipeline
            | "ManifestTrigger" >> beam.Create([None])
            | "WriteManifest" >> beam.ParDo(
                _WriteManifest(self.run_dir, self.header, self.maps_per_record),
                counts=beam.pvalue.AsList(counted),
                engines_used=beam.pvalue.AsList(engines_used | "DistinctEngines" >> beam.Distinct()),
                saliency_files=beam.pvalue.AsList(saliency_files),
                error_files=beam.pvalue.AsList(error_files),
                quality=beam.pvalue.AsSingleton(quality),
                sanity=beam.pvalue.AsSingleton(sanity, default_value=None),
                outcomes=beam.pvalue.AsList(outcomes | "CountOutcomes" >> beam.combiners.Count.PerElement()),
                **({"audit_files": beam.pvalue.AsList(audit_files[0])} if audit_files else {})))


class _Tables(beam.PTransform):
    """Groups rows into Arrow tables of at most ``rows_per_group`` rows (one row group each)."""

    def __init__(self, make_table, rows_per_group):
        super().__init__()
        self.make_table = make_table
        self.rows_per_group = rows_per_group

    def expand(self, rows):
        return (rows
                | "GroupRows" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.rows_per_group)
                | "ToArrow" >> beam.Map(self.make_table))
