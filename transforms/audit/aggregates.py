"""The audit's aggregates, computed by the pipeline beside the corpus: class saliency and per-class samples.

Every saliency row (explained, or carried over from a baseline) becomes one
unit-mass audit map (:func:`transforms.audit.pooling.unit_mass_pooled`). Two
combiners then reduce the maps per class, so what they hold is bounded by the
classes, never by the records:

* **class saliency**: per (target, group) the count, sum and sum of squares of
  the maps (float64), from which the mean and the population standard
  deviation follow exactly (:class:`ClassSaliencyFn`);
* **the sample**: per target the ``audit_samples`` maps with the smallest
  ``key_seed(seed, key)`` (Beam's ``Top``), a uniform choice of records that
  the seed fixes.

Rows made in different fused stages (explained; reused from a baseline) are
never flattened: each branch is combined where it is made, and only the small
per-class partial results (accumulators, top-n lists) are flattened and merged.
Both results go to Parquet under the run folder's ``_audit/``
(:mod:`transforms.audit.tables`); the step returns the written files' paths.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquetBatched

from transforms.audit import tables
from transforms.audit.pooling import AUDIT_DIR, ClassSaliency, SampledMap, pooled_shape, pooling_factor, \
    unit_mass_pooled
from transforms.engine.noise import key_seed

#: Class saliency records per written table (each holds two float64 maps of the audit's cells).
SALIENCY_TABLE_ROWS = 256


@dataclasses.dataclass(frozen=True)
class AuditSettings:
    """What the audit aggregates need to know of the run.

    Attributes:
        factor: the sum-pooling factor from stored maps to audit maps.
        cells: (rows, columns) of an audit map.
        samples: maps kept per class (``audit_samples``).
        seed: the run's noise seed, which orders the records for the sample.
    """

    factor: int
    cells: tuple
    samples: int
    seed: int

    @classmethod
    def for_maps(cls, map_shape, samples: int, seed: int) -> "AuditSettings":
        """The settings for stored maps of ``map_shape`` (``(H, W)`` or ``(H, W, C)``).

        Args:
            map_shape: the stored map's shape.
            samples: maps kept per class.
            seed: the run's seed.

        Returns:
            The settings, with the pooling factor and cells of :mod:`transforms.audit.pooling`.
        """
        factor = pooling_factor(map_shape)
        return cls(factor=factor, cells=pooled_shape(map_shape, factor), samples=int(samples), seed=int(seed))

    def manifest_block(self, downsample: int, input_shape) -> dict:
        """The manifest's ``audit`` block.

        Args:
            downsample: the stored maps' downsampling factor (input pixels per stored pixel side).
            input_shape: (H, W) of the model input.

        Returns:
            ``{"cells", "factor", "cell", "input_shape", "samples_per_class"}``; ``cell`` is input pixels per cell side.
        """
        return {"cells": list(self.cells), "factor": self.factor, "cell": self.factor * int(downsample),
                "input_shape": [int(input_shape[0]), int(input_shape[1])], "samples_per_class": self.samples}


def pool_row(row: dict, factor: int, seed: int) -> tuple[int, SampledMap]:
    """One saliency row → ``(key hash, SampledMap)``: its audit map and what the sample keeps of it.

    Args:
        row: a saliency row (its stored ``saliency`` map and scalar fields).
        factor: the pooling factor.
        seed: the run's seed, for the key hash.

    Returns:
        ``key_seed(seed, key)`` and the row as a :class:`SampledMap` (the pooled map is float32, unit mass).
    """
    label = row.get("label")
    return key_seed(seed, row["key"]), SampledMap(
        target=int(row["target"]), key=row["key"], source_file=row["source_file"],
        record_index=int(row["record_index"]), label=None if label is None else int(label),
        predicted=int(row["predicted"]), score=float(row["score"]), target_rank=int(row["target_rank"]),
        pooled=unit_mass_pooled(row["saliency"], factor))


def saliency_keys(item: tuple[int, SampledMap]) -> list[tuple[tuple[int, str], np.ndarray]]:
    """The class saliency groups a map counts in: ``(target, "all")``, and by correctness when labelled.

    A map is "correct" when the model's top-1 class (``predicted``) equals the record's label.
    """
    _, sampled = item
    keyed = [((sampled.target, "all"), sampled.pooled)]
    if sampled.label is not None:
        keyed.append(((sampled.target, "correct" if sampled.predicted == sampled.label else "wrong"), sampled.pooled))
    return keyed


def sample_order(item: tuple[int, SampledMap]) -> tuple:
    """The sample's order: key hash, then where the record is (never the map, which does not compare)."""
    key_hash, sampled = item
    return key_hash, sampled.key, sampled.source_file, sampled.record_index


class ClassSaliencyFn(beam.CombineFn):
    """Audit maps → ``(count, mean, std)``, exact, in memory of three numbers' worth per cell.

    The accumulator is ``(count, sum, sum of squares)``, the sums float64
    ``[rows, columns]``; the standard deviation is the population one,
    ``sqrt(max(0, E[x²] − mean²))``.

    Args:
        cells: (rows, columns) of an audit map.
    """

    def __init__(self, cells):
        self.cells = tuple(int(size) for size in cells)

    def create_accumulator(self):
        """No map yet."""
        return 0, np.zeros(self.cells), np.zeros(self.cells)

    def add_input(self, accumulator, pooled):
        """Adds one map (in place: an accumulator belongs to this combine)."""
        count, total, squares = accumulator
        values = np.asarray(pooled, np.float64)
        total += values
        squares += values * values
        return count + 1, total, squares

    def merge_accumulators(self, accumulators):
        """Sums accumulators into the first (which Beam allows to be modified)."""
        accumulators = iter(accumulators)
        count, total, squares = next(accumulators)
        for other_count, other_total, other_squares in accumulators:
            count += other_count
            total += other_total
            squares += other_squares
        return count, total, squares

    def extract_output(self, accumulator):
        """``(count, mean, std)``; zeros for no map."""
        count, total, squares = accumulator
        if not count:
            return 0, np.zeros(self.cells), np.zeros(self.cells)
        mean = total / count
        return count, mean, np.sqrt(np.maximum(0.0, squares / count - mean * mean))


class _PartialSums(ClassSaliencyFn):
    """The first half of a combine over several branches: its output is the accumulator itself."""

    def extract_output(self, accumulator):
        return accumulator


class _MergeSums(ClassSaliencyFn):
    """The second half: its inputs are :class:`_PartialSums` accumulators."""

    def add_input(self, accumulator, partial):
        return self.merge_accumulators([accumulator, partial])


def _class_saliency(element) -> ClassSaliency:
    (target, group), (count, mean, std) = element
    return ClassSaliency(target=target, group=group, count=count, mean=mean, std=std)


class _MergeSamples(beam.PTransform):
    """Per-class top-n lists of several branches → the n smallest of each class over all of them."""

    def __init__(self, samples: int):
        super().__init__()
        self.samples = samples

    def expand(self, lists):
        return (lists
                | "Unpack" >> beam.FlatMap(lambda element: [(element[0], item) for item in element[1]])
                | "Smallest" >> beam.combiners.Top.SmallestPerKey(self.samples, key=sample_order))


class AuditAggregates(beam.PTransform):
    """Saliency rows → ``_audit/class_saliency-*.parquet`` and ``_audit/class_sample-*.parquet``.

    Args:
        run_dir: the run folder.
        settings: the pooling and the sample size.

    The input is the saliency rows: one PCollection, or a dict of them made in
    different stages (e.g. ``{"": explained, "Reused": carried}``), which are
    combined apart. Returns (from ``expand``) the PCollection of the written
    files' paths.
    """

    def __init__(self, run_dir: str, settings: AuditSettings):
        super().__init__()
        self.run_dir = run_dir
        self.settings = settings

    def expand(self, rows):
        """Adds the pooling, combining and writing steps."""
        settings = self.settings
        branches = rows if isinstance(rows, dict) else {"": rows}
        single = len(branches) == 1
        saliency_parts, sample_parts = [], []
        for name, branch in branches.items():
            pooled = branch | f"PoolMaps{name}" >> beam.Map(pool_row, settings.factor, settings.seed)
            keyed_maps = pooled | f"SaliencyKeys{name}" >> beam.FlatMap(saliency_keys)
            keyed_samples = pooled | f"SampleKeys{name}" >> beam.Map(lambda item: (item[1].target, item))
            if single:  # one stage: combine once (Beam lifts the combine's first half into it)
                saliency = keyed_maps | "ClassSaliency" >> beam.CombinePerKey(ClassSaliencyFn(settings.cells))
                sample = keyed_samples | "ClassSample" >> beam.combiners.Top.SmallestPerKey(settings.samples,
                                                                                            key=sample_order)
            else:  # combined in the branch's own stage; only per-class partials are flattened below
                saliency_parts.append(keyed_maps | f"PartialSaliency{name}" >> beam.CombinePerKey(
                    _PartialSums(settings.cells)))
                sample_parts.append(keyed_samples | f"PartialSample{name}" >> beam.combiners.Top.SmallestPerKey(
                    settings.samples, key=sample_order))
        if not single:
            saliency = (saliency_parts | "SaliencyParts" >> beam.Flatten()
                        | "ClassSaliency" >> beam.CombinePerKey(_MergeSums(settings.cells)))
            sample = sample_parts | "SampleParts" >> beam.Flatten() | "ClassSample" >> _MergeSamples(settings.samples)
        folder = FileSystems.join(self.run_dir, AUDIT_DIR)
        saliency_schema = tables.class_saliency_schema(settings.cells)
        sample_schema = tables.class_sample_schema(settings.cells)
        saliency_files = (
            saliency
            | "ToClassSaliency" >> beam.Map(_class_saliency)
            | "GroupClassSaliency" >> beam.BatchElements(min_batch_size=1, max_batch_size=SALIENCY_TABLE_ROWS)
            | "ClassSaliencyTables" >> beam.Map(tables.class_saliency_table, saliency_schema)
            | "WriteClassSaliency" >> WriteToParquetBatched(
                FileSystems.join(folder, tables.CLASS_SALIENCY), schema=saliency_schema, codec="zstd",
                file_name_suffix=".parquet"))
        sample_files = (
            sample
            | "ClassSampleTables" >> beam.Map(  # one table per class, in sample order
                lambda element, schema: tables.class_sample_table(sorted(element[1], key=sample_order), schema),
                sample_schema)
            | "WriteClassSample" >> WriteToParquetBatched(
                FileSystems.join(folder, tables.CLASS_SAMPLE), schema=sample_schema, codec="zstd",
                file_name_suffix=".parquet"))
        return (saliency_files, sample_files) | "AuditFiles" >> beam.Flatten()
