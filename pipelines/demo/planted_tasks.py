"""The image tasks of the planted-shortcut datasets, and the planting of a mark into one example.

Two tasks, each a class decided by one object on a cluttered background, with
the object's pixel mask:

* ``shapes``: the demo's drawing (:mod:`pipelines.demo.demo_drawing`), a
  filled shape (disc, square, triangle, cross, bar, half-disc, ell, frame)
  at a random place, size, rotation and colour;
* ``gratings``: a disc-shaped patch filled with a sinusoidal grating whose
  **orientation** is the class (``180 / classes`` degrees apart), among thin
  straight strokes at every orientation, so the model has to find the
  periodic patch, not just any edge.

:func:`draw_planted` draws one example of a task and decides, from the same
random stream, whether it carries the shortcut mark (:class:`Plant`). The
object always stays off the mark's box, in the planted set and its clean twin
alike, so the two differ only inside the box and the mark never hides the
object.

Both tasks take a ``contrast``: the share of the object's full contrast
against the background it is drawn with (1: as drawn; 0.2: blended four
fifths into the background under it). Drawn per image from a range
(:func:`draw_planted`'s ``object_contrast``), it makes some objects hard to
see in every class alike, as in real photographs, so a model trained on the
planted set has a reason to use the mark; the default ``(1, 1)`` draws no
extra random number, so the demo's images do not change.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipelines.demo.demo_drawing import SHAPE_NAMES, draw_example, draw_layers
from pipelines.demo.planted_marks import MARK_KINDS, apply_mark, boxes_touch

TASKS = ("shapes", "gratings")
MAX_CLASSES = 8


@dataclasses.dataclass(frozen=True)
class Plant:
    """Where and on which images the shortcut mark goes.

    Attributes:
        kind: the mark, one of :data:`pipelines.demo.planted_marks.MARK_KINDS`.
        box: ``(y0, x0, y1, x1)``, end exclusive (see :func:`pipelines.demo.planted_marks.mark_box`).
        shortcut_class: the class whose images carry the mark.
        share: the share of that class's images carrying it.
        other_share: the share of every other class's images carrying it.
    """

    kind: str
    box: tuple
    shortcut_class: int
    share: float = 0.8
    other_share: float = 0.0

    def __post_init__(self):
        if self.kind not in MARK_KINDS:
            raise ValueError(f"'kind' must be one of {', '.join(MARK_KINDS)}; got {self.kind!r}.")
        for name in ("share", "other_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"'{name}' must be between 0 and 1; got {getattr(self, name)!r}.")


@dataclasses.dataclass(frozen=True)
class PlantedExample:
    """One drawn example, with and without the mark.

    Attributes:
        image: ``uint8 [S, S, 3]``, with the mark when ``carries``.
        clean: ``uint8 [S, S, 3]``, never marked (the clean twin's image).
        mask: ``bool [S, S]``, the object's pixels (never the mark's).
        label: the class.
        carries: whether ``image`` carries the mark.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    label: int
    carries: bool


def class_names(task: str, classes: int) -> list[str]:
    """The class names of a task with ``classes`` classes (shape names, or grating angles)."""
    if task == "shapes":
        return list(SHAPE_NAMES[:classes])
    return [f"{round(180 * label / classes)}deg" for label in range(classes)]


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _check_contrast(contrast: float) -> None:
    if not 0.0 <= contrast <= 1.0:
        raise ValueError(f"'contrast' must be between 0 and 1; got {contrast!r}.")


def draw_grating(rng: np.random.Generator, image_size: int = 64, classes: int = 4,
                 keep_out=None, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """One grating example: ``(image uint8 [S, S, 3], patch mask bool [S, S], label)``.

    Args:
        rng: the random stream; the example depends on nothing else.
        image_size: side ``S`` of the square image, at least 32.
        classes: number of orientations, ``180 / classes`` degrees apart (2 to 8).
        keep_out: a ``(y0, x0, y1, x1)`` box the patch stays a pixel away from, or None.
        contrast: the share of the grating's contrast against the background (1: the grating replaces it).

    Returns:
        The image, the patch's pixels and the orientation class.
    """
    _check_contrast(contrast)
    if image_size < 32:
        raise ValueError(f"'image_size' must be >= 32; got {image_size!r}.")
    size = image_size
    rows, cols = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (cols * math.cos(angle) + rows * math.sin(angle)) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    canvas = _colour(rng) * (1 - ramp[..., None]) + _colour(rng) * ramp[..., None]
    centre, width = rng.uniform(0, size, 2), rng.uniform(0.15, 0.3) * size
    blob = rng.uniform(0.3, 0.6) * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width ** 2))
    canvas = canvas * (1 - blob[..., None]) + _colour(rng) * blob[..., None]
    for _ in range(rng.integers(4, 9)):  # thin straight strokes at any orientation
        start = rng.uniform(0, size, 2)
        heading, length = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6) * size
        direction = np.array([math.sin(heading), math.cos(heading)])
        along = np.clip((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1], 0, length)
        distance = np.hypot(rows - start[0] - along * direction[0], cols - start[1] - along * direction[1])
        canvas[distance <= rng.uniform(0.5, 1.0)] = _colour(rng)

    label = int(rng.integers(classes))
    step = 180.0 / classes
    # Jitter a quarter of the gap between two classes at most, never more than 6 degrees.
    jitter = min(6.0, step / 4)
    theta = math.radians(step * label + rng.uniform(-jitter, jitter))
    radius = rng.uniform(0.125, 0.2) * size
    centre = rng.uniform(radius + 1, size - radius - 1, 2)
    for _ in range(200):  # off the mark's box (see the module docstring)
        if keep_out is None or not boxes_touch(keep_out, centre, radius):
            break
        centre = rng.uniform(radius + 1, size - radius - 1, 2)
    else:
        raise ValueError(f"no place for the patch away from the box {keep_out!r} in a {size}-pixel image.")
    mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2
    # Stripes run along theta: the phase varies across them.
    across = -(cols - centre[1]) * math.sin(theta) + (rows - centre[0]) * math.cos(theta)
    period = rng.uniform(size / 16, size / 9)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * across / period + rng.uniform(0, 2 * math.pi))
    first, second = _colour(rng), _colour(rng)
    while np.abs(first - second).max() < 96:  # enough contrast between the stripes
        second = _colour(rng)
    grating = first * (1 - wave[..., None]) + second * wave[..., None]
    if contrast == 1.0:
        canvas[mask] = grating[mask]
    else:
        canvas[mask] = canvas[mask] * (1.0 - contrast) + grating[mask] * contrast
    canvas += rng.normal(0.0, rng.uniform(4.0, 10.0), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask, label


def _draw_shape(rng: np.random.Generator, image_size: int, classes: int, keep_out,
                contrast: float) -> tuple[np.ndarray, np.ndarray, int]:
    if contrast == 1.0:
        return draw_example(rng, image_size, classes=classes, keep_out=keep_out)
    layers = draw_layers(rng, image_size, classes=classes, keep_out=keep_out)
    image = layers.background.astype(np.float64)
    image[layers.mask] = image[layers.mask] * (1.0 - contrast) + layers.colour.astype(np.float64) * contrast
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), layers.mask, layers.label


def draw_task(task: str, rng: np.random.Generator, image_size: int, classes: int,
              keep_out=None, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """One example of ``task``: ``(image uint8 [S, S, 3], object mask bool [S, S], label)``.

    Args:
        task: one of :data:`TASKS`.
        rng: the random stream.
        image_size: side of the square image, at least 32.
        classes: number of classes, 2 to :data:`MAX_CLASSES`.
        keep_out: a box the object stays off, or None.
        contrast: the share of the object's full contrast against the background it is drawn with, 0 to 1.

    Returns:
        The image, the object's pixels and the class.
    """
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"'classes' must be between 2 and {MAX_CLASSES}; got {classes!r}.")
    _check_contrast(contrast)
    if task == "shapes":
        return _draw_shape(rng, image_size, classes, keep_out, contrast)
    if task == "gratings":
        return draw_grating(rng, image_size, classes, keep_out, contrast)
    raise ValueError(f"'task' must be one of {', '.join(TASKS)}; got {task!r}.")


def draw_planted(rng: np.random.Generator, task: str, image_size: int, classes: int, plant: Plant,
                 object_contrast=(1.0, 1.0)) -> PlantedExample:
    """One example of ``task`` and whether it carries the mark of ``plant``.

    The example is drawn first (off the mark's box), then one uniform number
    decides the mark, so the clean twin (``.clean``) is the same drawing.

    Args:
        rng: the example's own random stream.
        task: one of :data:`TASKS`.
        image_size: side of the square image.
        classes: number of classes.
        plant: the mark, its box and shares.
        object_contrast: ``(low, high)``: the object's contrast (see the module
            docstring) is drawn uniformly between them, first, for every class
            alike; with ``low == high`` nothing is drawn.

    Returns:
        A :class:`PlantedExample`.
    """
    low, high = (float(value) for value in object_contrast)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"'object_contrast' must be (low, high) with 0 <= low <= high <= 1; got {object_contrast!r}.")
    contrast = float(rng.uniform(low, high)) if low < high else low
    image, mask, label = draw_task(task, rng, image_size, classes, keep_out=plant.box, contrast=contrast)
    share = plant.share if label == plant.shortcut_class else plant.other_share
    carries = bool(rng.uniform() < share)
    marked = apply_mark(image, plant.kind, plant.box) if carries else image
    return PlantedExample(image=marked, clean=image, mask=mask, label=label, carries=carries)


def shortcut_truth(plant: Plant, names: list[str], test_ids: list[str], test_carries, train_carries,
                   **more) -> dict:
    """The ground-truth fields of a planted shortcut, shared by the demo and the planted datasets.

    Args:
        plant: the mark, its box, the class and shares.
        names: the class names.
        test_ids: the test records' ``image/id`` values, in record order.
        test_carries: which test records carry the mark.
        train_carries: which training records carry the mark.
        **more: further fields (task, architecture, accuracy, reliance, ...).

    Returns:
        ``shortcut_class``, ``shortcut_class_name``, ``box`` (``[y0, x0, y1, x1]``,
        input pixels, end exclusive), ``mark_kind``, ``mark_size``, ``share``,
        ``other_share``, ``planted_keys`` (the test ids carrying the mark, in
        record order), ``planted_count`` (per split), then ``more``.
    """
    test_carries, train_carries = np.asarray(test_carries, bool), np.asarray(train_carries, bool)
    return {"shortcut_class": int(plant.shortcut_class), "shortcut_class_name": names[plant.shortcut_class],
            "box": [int(value) for value in plant.box], "mark_kind": plant.kind,
            "mark_size": int(plant.box[2] - plant.box[0]), "share": plant.share, "other_share": plant.other_share,
            "planted_keys": [key for key, carries in zip(test_ids, test_carries) if carries],
            "planted_count": {"train": int(train_carries.sum()), "test": int(test_carries.sum())}, **more}
