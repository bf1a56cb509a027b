"""The explain stage: Beam's ``RunInference`` with a SmoothGrad ``ModelHandler``.

:class:`SmoothGradModelHandler` tells ``RunInference`` how to load the
per-worker engine (:class:`WorkerEngine`: the Keras model and its compiled
SmoothGrad function) and how to run it on a batch of decoded examples.
``RunInference`` brings the rest: batching to the fixed batch size, one model
per process (``shared.Shared``) or, with ``model_copies``, N models per machine
shared by all its SDK processes, and the standard inference metrics
(``num_inferences``, ``inference_batch_latency_micro_secs``,
``load_model_latency_milli_secs``, ...) in the project's metrics namespace.

With model sharing the handler's "model" is a proxy to an object in another
process: only public methods can be called, and their arguments and results are
pickled. So the whole SmoothGrad call happens inside :meth:`WorkerEngine.explain`,
numpy in and numpy out.

Each input example yields exactly one :class:`Explained` result: its maps, or
the one-line reason it could not be explained. A batch that fails is retried
record by record, so only the records at fault fail.

With ``samples: auto`` the handler runs the first stage only (``stage=0``);
:mod:`transforms.explain.explain_stages` adds the later ones.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.utils import shared

from transforms.decode.decode import Example
from transforms.support.errors import NAMESPACE, one_line

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExplainSettings:
    """What a worker needs to load its model and build its engine.

    Attributes:
        model: the model source (a file, a SavedModel folder or ``keras.applications:<Name>``).
        weights: weights for the model source, or None.
        safe_mode: Keras safe mode for ``.keras`` files.
        engine: keyword arguments of :class:`transforms.smoothgrad.SmoothGrad`.
        cpu_kernels: the run's kernel library; a worker whose TensorFlow was
            imported with the other one says so (its maps use what it has).
    """

    model: str
    weights: str | None
    safe_mode: bool
    engine: dict
    cpu_kernels: str | None = None


@dataclasses.dataclass
class EngineOutput:
    """What one :meth:`WorkerEngine.explain` call returns (numpy arrays; picklable).

    Attributes:
        result: the engine's :class:`~transforms.smoothgrad.SmoothGradResult`,
            with a class axis always present (``maps`` ``[B, K, ...]``;
            ``targets``, ``target_ranks`` and ``scores`` ``[B, K]``; K = 1
            unless the target is topk).
        jit_used: the compilation mode the engine ran in (``xla`` or ``graph``).
        new_compiles: times the engine's function was traced since the previous
            output of this engine (so that summing them counts every compile once).
        partials: with ``samples: auto``, one :class:`transforms.engine.adaptive.Partial`
            per image instead of ``result``.
        device: the kind of device the engine computes on
            (:func:`transforms.engine.device.device_kind`).
    """

    result: Any
    jit_used: str
    new_compiles: int
    partials: list | None = None
    device: str | None = None


class WorkerEngine:
    """The per-worker model and compiled SmoothGrad function (what ``load_model`` returns).

    Args:
        settings: the model source and the engine's options.

    Example:
        >>> engine = WorkerEngine(settings)
        >>> output = engine.explain(images, ["a", "b"])
        >>> output.maps.shape          # [2, 1, H, W]
    """

    def __init__(self, settings: ExplainSettings):
        from transforms.support.models import load_model
        from transforms.engine.smoothgrad import SmoothGrad

        started = time.time()
        self._model = load_model(settings.model, settings.weights, safe_mode=settings.safe_mode)
        self._engine = SmoothGrad(self._model, **settings.engine)
        self._lock = threading.Lock()  # threads of one process (or callers of a shared proxy) take turns
        self._compiles_reported = 0
        logger.info("Loaded %s and built SmoothGrad (jit=%s) in %.1f s.", settings.model,
                    self._engine.jit_used, time.time() - started)
        if settings.cpu_kernels and self._engine.device.startswith("cpu") \
                and not self._engine.device.endswith(settings.cpu_kernels):
            logger.warning("cpu_kernels: %s asked, but TensorFlow was imported in this worker process before the "
                           "job with other kernels; its maps are computed on %s, as the manifest's devices_used "
                           "says.", settings.cpu_kernels, self._engine.device)

    def explain(self, images: np.ndarray, keys: Sequence[str], targets: np.ndarray | None = None) -> EngineOutput:
        """Explains one batch.

        Args:
            images: float32 ``[B, H, W, C]``, preprocessed.
            keys: one key per image (the noise depends on it).
            targets: the classes to explain, ``[B]`` ints, for ``target="label"``.

        Returns:
            An :class:`EngineOutput`.
        """
        with self._lock:
            result = self._engine(images, list(keys), targets)
            new_compiles = self._new_compiles()
            if self._engine.target.mode != "topk":  # one class per image: add its axis
                result = dataclasses.replace(result, maps=result.maps[:, None], targets=result.targets[:, None],
                                             target_ranks=result.target_ranks[:, None],
                                             scores=result.scores[:, None],
                                             reliability=None if result.reliability is None
                                             else result.reliability[:, None])
            return EngineOutput(result=result, jit_used=self._engine.jit_used, new_compiles=new_compiles,
                                device=self._engine.device)

    def begin(self, images: np.ndarray, keys: Sequence[str], targets: np.ndarray | None = None) -> EngineOutput:
        """The first ``samples: auto`` stage of one batch (``output.partials``); arguments as :meth:`explain`."""
        with self._lock:
            partials = self._engine.begin(images, list(keys), targets)
            return EngineOutput(result=None, jit_used=self._engine.jit_used, new_compiles=self._new_compiles(),
                                partials=partials, device=self._engine.device)

    def resume(self, images: np.ndarray, keys: Sequence[str], partials: list) -> EngineOutput:
        """The next ``samples: auto`` stage of unfinished images (all at one sample count)."""
        with self._lock:
            partials = self._engine.resume(images, list(keys), partials)
            return EngineOutput(result=None, jit_used=self._engine.jit_used, new_compiles=self._new_compiles(),
                                partials=partials, device=self._engine.device)

    def _new_compiles(self) -> int:
        new_compiles = self._engine.compile_count - self._compiles_reported
        self._compiles_reported = self._engine.compile_count
        return new_compiles


@dataclasses.dataclass
class Explained:
    """The result for one example: its maps, or why it has none.

    Attributes:
        example: the decoded example.
        maps: ``[K, H, W]`` (``[K, H, W, C]`` with ``reduce: none``), float32; None on failure.
        targets, target_ranks, scores: ``[K]`` each; None on failure.
        predicted: the clean top-1 class; None on failure.
        noise_sigma: the σ used; None on failure.
        reliability: ``[K]`` split-half reliability of each map (NaN where it
            cannot be measured); None on failure or when not computed.
        jit_used: the engine's compilation mode; None when the engine did not run.
        device: the kind of device that computed the maps; None when the engine did not run.
        error: the one-line reason of a failure, else None.
        samples_used: the noisy samples behind the maps; None on failure.
        partial: with ``samples: auto``, an image not finished yet: its
            :class:`transforms.engine.adaptive.Partial` for the next stage (no maps yet).
    """

    example: Example
    maps: np.ndarray | None = None
    targets: np.ndarray | None = None
    target_ranks: np.ndarray | None = None
    scores: np.ndarray | None = None
    predicted: int | None = None
    noise_sigma: float | None = None
    reliability: np.ndarray | None = None
    jit_used: str | None = None
    error: str | None = None
    samples_used: int | None = None
    partial: Any = None
    device: str | None = None


#: The process's engine for the stages of ``samples: auto`` (a Beam ``Shared`` made when the module is imported,
#: so it is one per process: every stage's step acquires the same engine).
_STAGE_ENGINES = shared.Shared()


def shared_engine(settings: ExplainSettings) -> WorkerEngine:
    """This process's :class:`WorkerEngine` for ``settings``, built on first use and kept while a step holds it."""
    return _STAGE_ENGINES.acquire(lambda: WorkerEngine(settings), tag=repr(settings))


class SmoothGradModelHandler(ModelHandler[Example, Explained, WorkerEngine]):
    """RunInference's handler for SmoothGrad: decoded examples in, :class:`Explained` out.

    Args:
        settings: the model source and the engine's options.
        batch_size: the fixed batch size the engine is compiled for; batches
            are formed at exactly this size (the engine pads short ones).
        model_copies: None for one model per worker process; N for N models
            per machine, shared by all its SDK processes.
        stage: with ``samples: auto``, the stage this handler runs: 0 takes
            decoded examples, a later one the unfinished :class:`Explained` of
            the stage before; None (the default) explains with a fixed ``samples``.
            A staged handler's engine is the process's :func:`shared_engine`,
            so the stages of one process load the model once.

    Example:
        >>> results = examples | "SmoothGrad" >> RunInference(SmoothGradModelHandler(settings, 8))
    """

    def __init__(self, settings: ExplainSettings, batch_size: int, model_copies: int | None = None,
                 stage: int | None = None):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size, model_copies=model_copies)
        self.settings = settings
        self.stage = stage
        self.compiles = Metrics.counter(NAMESPACE, "engine_compiles")

    def load_model(self) -> WorkerEngine:
        """Loads the model and builds its engine (once per process, or once per shared copy)."""
        return WorkerEngine(self.settings) if self.stage is None else shared_engine(self.settings)

    def get_metrics_namespace(self) -> str:
        """RunInference's metrics go into the project's namespace."""
        return NAMESPACE

    def get_num_bytes(self, batch: Sequence) -> int:
        """The batch's size from its arrays (Beam's default pickles the whole batch)."""
        total = 0
        for item in batch:
            if isinstance(item, Explained):  # a later stage: the example and its carried sums
                total += item.partial.nbytes if item.partial is not None else 0
                item = item.example
            total += item.image.nbytes + (item.mask.nbytes if item.mask is not None else 0)
        return total

    def run_inference(self, batch: Sequence[Example], model: Any,
                      inference_args: dict | None = None) -> Iterable[Explained]:
        """Explains a batch; yields one :class:`Explained` per example.

        A failing batch is retried one example at a time, so that only the
        examples at fault become failures.
        """
        batch = list(batch)
        try:
            return self._explain(model, batch)
        except Exception as error:  # noqa: BLE001 - a failing batch must not kill the run
            logger.warning("SmoothGrad failed on a batch of %d (%s); retrying its records one by one.",
                           len(batch), one_line(error))
        results = []
        for item in batch:
            try:
                results += self._explain(model, [item])
            except Exception as error:  # noqa: BLE001
                example = item.example if isinstance(item, Explained) else item
                results.append(Explained(example, error=f"SmoothGrad failed: {type(error).__name__}: "
                                                        f"{one_line(error)}"))
        return results

    def _explain(self, model, batch: list) -> list[Explained]:
        if self.stage is not None:
            return self._explain_stage(model, batch)
        output = model.explain(np.stack([example.image for example in batch]),
                               [example.key for example in batch], self._label_targets(batch))
        self.compiles.inc(output.new_compiles)
        result = output.result
        return [Explained(example, maps=result.maps[position], targets=result.targets[position],
                          target_ranks=result.target_ranks[position], scores=result.scores[position],
                          predicted=int(result.predicted[position]),
                          noise_sigma=float(result.noise_sigma[position]),
                          reliability=None if result.reliability is None else result.reliability[position],
                          samples_used=int(result.samples_used[position]), jit_used=output.jit_used,
                          device=output.device)
                for position, example in enumerate(batch)]

    def _label_targets(self, examples: list[Example]) -> np.ndarray | None:
        """The records' labels as the classes to explain with ``target: label``; else None."""
        if str(self.settings.engine.get("target", "top1")) != "label":
            return None
        return np.array([example.label for example in examples], np.int64)

    def _explain_stage(self, model, batch: list) -> list[Explained]:
        if self.stage == 0:
            examples = batch
            output = model.begin(np.stack([example.image for example in examples]),
                                 [example.key for example in examples], self._label_targets(examples))
        else:
            examples = [item.example for item in batch]
            output = model.resume(np.stack([example.image for example in examples]),
                                  [example.key for example in examples], [item.partial for item in batch])
        self.compiles.inc(output.new_compiles)
        return [staged_result(example, partial, output.jit_used, output.device)
                for example, partial in zip(examples, output.partials)]


def staged_result(example: Example, partial, jit_used: str, device: str | None = None) -> Explained:
    """The :class:`Explained` of one image after a stage: its maps when done, else its carried state."""
    if not partial.done:
        return Explained(example, jit_used=jit_used, partial=partial, device=device)
    return Explained(example, maps=partial.maps, targets=partial.targets, target_ranks=partial.target_ranks,
                     scores=partial.scores, predicted=partial.predicted, noise_sigma=partial.noise_sigma,
                     reliability=partial.reliability, samples_used=partial.samples, jit_used=jit_used,
                     device=device)

