"""The explain step with ``samples: auto``: the first stage, then one Beam step per later stage.

Each image is explained in stages (:class:`transforms.engine.adaptive.AdaptiveSamples`:
by default 8 samples, then up to 12, 16, ... 64). The first stage is Beam's
``RunInference`` with the staged :class:`transforms.explain.explain.SmoothGradModelHandler`;
each later stage is a :class:`ResumeStage` step that batches only the images
still unfinished (each carries its running sums in its
:class:`transforms.explain.explain.Explained`) and passes the finished ones on as they
are. No flatten joins the stages: every finished image leaves the last step,
so the whole explain step stays in the fused stage with the read, decode and
row steps, and nothing crosses a stage boundary (a flatten of several steps
would be one on Beam's local runner, which would hold every map in memory).

Every stage of a process uses one engine (:func:`transforms.explain.explain.shared_engine`):
the model is loaded once, and the engine's two compiled functions (the first
stage, and every later stage, whose first sample and count are inputs) are
traced once each per batch shape. With ``model_copies`` the first stage's
engines live in the machine's shared model processes and the later stages
share one more, in a process of its own.
"""

from __future__ import annotations

import logging
import uuid
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms import window

from transforms.support.errors import NAMESPACE
from transforms.explain.explain import Explained, ExplainSettings, SmoothGradModelHandler, shared_engine

logger = logging.getLogger(__name__)


def _finished(explained: Explained) -> bool:
    return explained.partial is None


class ResumeStage(beam.DoFn):
    """One later stage: unfinished images batched and explained further; finished ones passed on.

    Args:
        settings: the model source and the engine's options (``samples="auto"``).
        batch_size: the fixed batch (a bundle's last batch is padded by the engine).
        stage: the stage's index (1 for the second stage, ...).
        model_copies: as for :class:`transforms.explain.explain.SmoothGradModelHandler`.
        model_tag: with ``model_copies``, the name of the machine-wide engine of the later stages.

    At most ``batch_size - 1`` unfinished images wait in a step at a time.
    """

    def __init__(self, settings: ExplainSettings, batch_size: int, stage: int, model_copies: int | None = None,
                 model_tag: str | None = None):
        self.settings = settings
        self.batch_size = batch_size
        self.stage = stage
        self.model_copies = model_copies
        self.model_tag = model_tag
        self.handler = SmoothGradModelHandler(settings, batch_size, stage=stage)
        self.resumed = Metrics.counter(NAMESPACE, f"stage{stage}_images")
        self._engine = None
        self._waiting: list[Explained] = []

    def setup(self):
        """Acquires the process's (or, with ``model_copies``, the machine's) engine of the stages."""
        if self.model_copies:
            from apache_beam.utils import multi_process_shared

            from transforms.explain.explain import WorkerEngine

            settings = self.settings
            self._engine = multi_process_shared.MultiProcessShared(
                lambda: WorkerEngine(settings), tag=self.model_tag, always_proxy=True).acquire()
        else:
            self._engine = shared_engine(self.settings)

    def start_bundle(self):
        """Nothing waits at a bundle's start."""
        self._waiting = []

    def process(self, explained: Explained):
        """Passes a finished image on; queues an unfinished one, explaining a full batch."""
        if _finished(explained):
            yield explained
            return
        self._waiting.append(explained)
        if len(self._waiting) >= self.batch_size:
            yield from self._explain()

    def finish_bundle(self):
        """Explains the last, partial batch of the bundle."""
        for explained in self._explain():
            yield window.GlobalWindows.windowed_value(explained)

    def _explain(self) -> list[Explained]:
        batch, self._waiting = self._waiting, []
        if not batch:
            return []
        self.resumed.inc(len(batch))
        return list(self.handler.run_inference(batch, self._engine))


class ExplainInStages(beam.PTransform):
    """``samples: auto`` as Beam steps: ``RunInference`` for the first stage, a :class:`ResumeStage` per later one.

    Args:
        settings: the model source and the engine's options (``samples="auto"``).
        batch_size: the fixed batch of every stage.
        model_copies: as for :class:`transforms.explain.explain.SmoothGradModelHandler`.
        boundaries: the sample count at the end of each stage
            (:attr:`transforms.engine.adaptive.AdaptiveSamples.boundaries`).

    The input is the decoded examples; the output one finished
    :class:`transforms.explain.explain.Explained` per example (its maps, or its
    error). Step names say the samples done at each stage's end (``Samples8``,
    ``Samples12``, ...).

    Example:
        >>> explained = examples | "SmoothGrad" >> ExplainInStages(settings, 16, None, (8, 12, 16))
    """

    def __init__(self, settings: ExplainSettings, batch_size: int, model_copies: int | None,
                 boundaries: Sequence[int]):
        super().__init__()
        self.settings = settings
        self.batch_size = batch_size
        self.model_copies = model_copies
        self.boundaries = tuple(boundaries)

    def expand(self, examples):
        first = SmoothGradModelHandler(self.settings, self.batch_size, self.model_copies, stage=0)
        explained = examples | f"Samples{self.boundaries[0]}" >> RunInference(first)
        model_tag = f"smoothgrad-audit-stages-{uuid.uuid4().hex}"
        for stage, boundary in enumerate(self.boundaries[1:], start=1):
            explained = explained | f"Samples{boundary}" >> beam.ParDo(
                ResumeStage(self.settings, self.batch_size, stage, self.model_copies, model_tag))
        return explained
