"""Explained examples → rows of the corpus: saliency rows, or error rows for the maps that cannot be stored.

The raw full-resolution map is checked (finite, within the storage dtype's
range), scored against the object mask when there is one, summarised by the
per-map statistics (and the engine's split-half reliability), then
down-sampled, normalised and cast to the storage dtype.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.rows import postprocess
from transforms.support.errors import ERRORS, NAMESPACE, error_row
from transforms.explain.explain import Explained
from transforms.support.progress import CountProgress, ProgressSettings
from transforms.engine.statistics import map_statistics


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """How maps are stored.

    Attributes:
        dtype: ``float16`` or ``float32``.
        normalize: the per-map normalisation.
        downsample: the integer average-pooling factor (1: full resolution).
        mask_columns: whether rows carry ``mass_in_mask`` and ``pointing_hit``.
    """

    dtype: str
    normalize: postprocess.Normalization
    downsample: int
    mask_columns: bool


class ToRows(beam.DoFn):
    """:class:`Explained` → saliency rows (main output, K per example) or one error row (``errors``).

    Each saliency row carries a private ``_first`` field, true on the first row
    of its example, by which the manifest counts explained records.

    Args:
        settings: how maps are stored.
        progress: the run's progress settings (explained records are counted there), or None.
    """

    def __init__(self, settings: RowSettings, progress: ProgressSettings | None = None):
        self.settings = settings
        self.explained = Metrics.counter(NAMESPACE, "records_explained")
        self.failed = Metrics.counter(NAMESPACE, "errors_explain")
        self.progress = CountProgress(progress)

    def setup(self):
        """Starts the run's progress in this process."""
        self.progress.setup()

    def start_bundle(self):
        """Publishes the run's expected record count as a gauge."""
        self.progress.publish_expected()

    def teardown(self):
        """Releases the run's progress."""
        self.progress.teardown()

    def process(self, explained: Explained):
        """Rows of one explained example, or its error row."""
        example = explained.example
        problem = explained.error or self._check(explained.maps)
        if problem:
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(ERRORS, error_row(example.key, example.source_file,
                                                              example.record_index, "explain", problem,
                                                              example.record_sha256))
            return
        self.explained.inc()
        self.progress.add("explained")
        for rank in range(explained.maps.shape[0]):
            yield self._row(example, explained, rank, explained.maps[rank])

    def _check(self, maps: np.ndarray) -> str | None:
        if not np.all(np.isfinite(maps)):
            return "saliency map has NaN or Inf values (non-finite gradients)"
        if self.settings.dtype == "float16" and self.settings.normalize.kind == "none" \
                and float(np.max(np.abs(maps))) >= np.finfo(np.float16).max:
            return "saliency values exceed the float16 range; use dtype float32 or a normalize option"
        return None

    def _row(self, example, explained: Explained, rank: int, saliency: np.ndarray) -> dict:
        row = {
            "key": example.key, "source_file": example.source_file, "record_index": example.record_index,
            "record_sha256": example.record_sha256,
            "label": example.label, "target": int(explained.targets[rank]),
            "target_rank": int(explained.target_ranks[rank]), "score": float(explained.scores[rank]),
            "predicted": explained.predicted, "noise_sigma": explained.noise_sigma,
            "samples_used": explained.samples_used,
            "_first": rank == 0,
        }
        if self.settings.mask_columns:
            inside, hit = (postprocess.mask_figures(saliency, example.mask)
                           if example.mask is not None else (None, None))
            row["mass_in_mask"], row["pointing_hit"] = inside, hit
        row.update(map_statistics(saliency))  # from the raw full-resolution map
        reliability = None if explained.reliability is None else float(explained.reliability[rank])
        row["reliability"] = reliability if reliability is not None and np.isfinite(reliability) else None
        stored = self.settings.normalize(postprocess.downsample(saliency, self.settings.downsample))
        row["height"], row["width"] = int(stored.shape[0]), int(stored.shape[1])
        row["saliency"] = stored.astype(np.float16 if self.settings.dtype == "float16" else np.float32)
        return row
