"""Drawing of the demo images: one class shape on a cluttered background (pure numpy).

The class of each image is decided by **one** object (a disc, a square, a
triangle or a cross) at a random place, size, rotation and colour on a
cluttered background (a colour gradient, soft blobs, pixel noise and thin
distractor strokes that are none of the class shapes). The object's pixel mask
comes with the image, so a saliency map can be scored by how much of its mass
falls on the object.

Everything here depends only on the ``numpy.random.Generator`` passed in:
:mod:`pipelines.demo.demo_records` gives every example its own stream.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipelines.demo.planted_marks import boxes_touch

# The demo's four classes; the planted-shortcut datasets (pipelines.demo.planted)
# use up to eight shapes, all different under rotation.
SHAPE_NAMES = ("disc", "square", "triangle", "cross", "bar", "half-disc", "ell", "frame")
CLASS_NAMES = SHAPE_NAMES[:4]
# The object covers this share of the image (before rasterisation rounding).
AREA_SHARE_RANGE = (0.03, 0.08)
# Every object pixel differs from the background under it by at least this
# much in some channel (unless no colour of the 64 tried reaches it).
MIN_CONTRAST = 48
# Bump when the drawing changes, so existing demo folders are regenerated.
# 2: a planted shortcut mark (pipelines.demo.demo_records) and objects kept off its box.
GENERATOR_VERSION = 2


@dataclasses.dataclass(frozen=True)
class DemoLayers:
    """One example before compositing: the object goes over the background.

    Attributes:
        background: ``uint8 [S, S, 3]``, the cluttered background alone.
        mask: ``bool [S, S]``, the pixels the object covers.
        colour: ``uint8 [3]``, the object's flat colour.
        label: the object's class, an index into :data:`CLASS_NAMES`.
    """

    background: np.ndarray
    mask: np.ndarray
    colour: np.ndarray
    label: int

    def composite(self) -> np.ndarray:
        """The image: the background with the object's pixels set to its colour."""
        image = self.background.copy()
        image[self.mask] = self.colour
        return image


def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of the pixel centres, ``float64 [S, S]``."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    return np.meshgrid(centres, centres, indexing="ij")


def _segment_distance(rows, cols, start, end) -> np.ndarray:
    """Distance of every pixel centre to the segment ``start``-``end`` (row, col)."""
    direction = np.subtract(end, start, dtype=np.float64)
    length_sq = float(direction @ direction)
    offset_r, offset_c = rows - start[0], cols - start[1]
    if length_sq == 0.0:
        along = np.zeros_like(rows)
    else:
        along = np.clip((offset_r * direction[0] + offset_c * direction[1]) / length_sq, 0.0, 1.0)
    return np.hypot(offset_r - along * direction[0], offset_c - along * direction[1])


def _shape_mask(label: int, centre, size: float, angle: float, rows, cols) -> np.ndarray:
    """Rasterises one class shape: pixels whose centre lies inside it.

    ``size`` is the disc's radius, the square's half side, the triangle's
    circumradius, the cross's half span (its arms are a third of its span),
    the bar's half length (its width is a third of its length), the half-disc's
    radius, the ell's half side (arms two thirds of it wide) or the frame's
    outer half side (its hole is half as wide).
    """
    d_r, d_c = rows - centre[0], cols - centre[1]
    # Coordinates in the shape's own frame (rotated by -angle).
    u = d_c * math.cos(angle) + d_r * math.sin(angle)
    v = -d_c * math.sin(angle) + d_r * math.cos(angle)
    if label == 0:
        return u * u + v * v <= size * size
    if label == 1:
        return (np.abs(u) <= size) & (np.abs(v) <= size)
    if label == 2:
        inside = np.ones_like(u, dtype=bool)
        for normal in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            inside &= u * math.cos(normal) + v * math.sin(normal) <= size / 2
        return inside
    if label == 3:
        half_arm = size / 3
        return ((np.abs(u) <= half_arm) & (np.abs(v) <= size)) | ((np.abs(v) <= half_arm) & (np.abs(u) <= size))
    if label == 4:
        return (np.abs(u) <= size) & (np.abs(v) <= size / 3)
    if label == 5:
        return (u * u + v * v <= size * size) & (v >= 0)
    if label == 6:
        arm = 2 * size / 3
        in_square = (np.abs(u) <= size) & (np.abs(v) <= size)
        return in_square & ((u <= -size + arm) | (v <= -size + arm))
    if label == 7:
        return (np.abs(u) <= size) & (np.abs(v) <= size) & ~((np.abs(u) < size / 2) & (np.abs(v) < size / 2))
    raise ValueError(f"'label' must be one of {tuple(range(len(SHAPE_NAMES)))}; got {label!r}.")


def _size_for_area(label: int, area: float) -> tuple[float, float]:
    """The ``size`` of a shape covering ``area`` pixels, and its bounding radius."""
    if label == 0:
        radius = math.sqrt(area / math.pi)
        return radius, radius
    if label == 1:
        half_side = math.sqrt(area) / 2
        return half_side, half_side * math.sqrt(2)
    if label == 2:
        circumradius = math.sqrt(4 * area / (3 * math.sqrt(3)))
        return circumradius, circumradius
    if label == 3:
        # Cross of span 2s and arm width 2s/3: area = 2 * (2s * 2s/3) - (2s/3)^2 = 20 s^2 / 9.
        half_span = math.sqrt(9 * area / 20)
        return half_span, math.hypot(half_span, half_span / 3)
    if label == 4:  # 2s by 2s/3: area = 4 s^2 / 3
        half_length = math.sqrt(3 * area / 4)
        return half_length, math.hypot(half_length, half_length / 3)
    if label == 5:  # half of a disc of radius r: area = pi r^2 / 2
        radius = math.sqrt(2 * area / math.pi)
        return radius, radius
    if label == 6:  # two arms 4s/3 wide in a 2s square: area = 2 * 2s * 4s/3 - (4s/3)^2 = 32 s^2 / 9
        half_side = math.sqrt(9 * area / 32)
        return half_side, half_side * math.sqrt(2)
    if label == 7:  # a 2s square less an s square: area = 3 s^2
        half_side = math.sqrt(area / 3)
        return half_side, half_side * math.sqrt(2)
    raise ValueError(f"'label' must be one of {tuple(range(len(SHAPE_NAMES)))}; got {label!r}.")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random RGB colour, ``float64 [3]`` in [0, 255]."""
    return rng.integers(0, 256, size=3).astype(np.float64)


def _draw_background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """A cluttered background with no class shape in it, ``uint8 [S, S, 3]``.

    A linear colour gradient, 1-3 soft Gaussian blobs, 3-6 thin distractors
    (straight lines, wavy strokes, thin ring arcs: 1-2 px wide, so none reads as
    a filled disc, square, triangle or thick-armed cross), then pixel noise.
    """
    rows, cols = _pixel_grid(image_size)
    start, end = _random_colour(rng), _random_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (cols * math.cos(angle) + rows * math.sin(angle)) / image_size
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-9)
    canvas = start * (1 - ramp[..., None]) + end * ramp[..., None]

    for _ in range(rng.integers(1, 4)):
        centre = rng.uniform(0, image_size, size=2)
        sigma = rng.uniform(0.12, 0.3) * image_size
        weight = rng.uniform(0.3, 0.6) * np.exp(
            -((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
        canvas = canvas * (1 - weight[..., None]) + _random_colour(rng) * weight[..., None]

    for _ in range(rng.integers(3, 7)):
        kind = rng.integers(3)
        half_width = rng.uniform(0.5, 1.0)
        if kind == 0:
            stroke = _segment_distance(rows, cols, rng.uniform(0, image_size, 2),
                                       rng.uniform(0, image_size, 2)) <= half_width
        elif kind == 1:
            start_point = rng.uniform(0, image_size, 2)
            heading = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.3, 0.8) * image_size
            amplitude = rng.uniform(0.04, 0.12) * image_size
            waves = rng.uniform(0.5, 2.0)
            steps = np.linspace(0, 1, 17)
            along, across = steps * length, amplitude * np.sin(2 * math.pi * waves * steps)
            points = np.stack([start_point[0] + along * math.sin(heading) + across * math.cos(heading),
                               start_point[1] + along * math.cos(heading) - across * math.sin(heading)], axis=1)
            stroke = np.zeros_like(rows, dtype=bool)
            for first, second in zip(points[:-1], points[1:]):
                stroke |= _segment_distance(rows, cols, first, second) <= half_width
        else:
            centre = rng.uniform(0, image_size, 2)
            radius = rng.uniform(0.08, 0.25) * image_size
            arc_start, arc_span = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.6) * math.pi
            d_r, d_c = rows - centre[0], cols - centre[1]
            in_arc = np.mod(np.arctan2(d_r, d_c) - arc_start, 2 * math.pi) <= arc_span
            stroke = (np.abs(np.hypot(d_r, d_c) - radius) <= half_width) & in_arc
        canvas[stroke] = _random_colour(rng)

    canvas += rng.normal(0.0, rng.uniform(4.0, 12.0), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far (L-infinity) from every background pixel ``under`` [n, 3].

    Tries up to 64 random colours and keeps the first whose smallest per-pixel
    difference reaches :data:`MIN_CONTRAST`, else the best one tried.
    """
    under = under.astype(np.int16)
    best, best_contrast = None, -1
    for _ in range(64):
        colour = rng.integers(0, 256, size=3).astype(np.int16)
        contrast = int(np.abs(under - colour).max(axis=1).min())
        if contrast > best_contrast:
            best, best_contrast = colour, contrast
        if contrast >= MIN_CONTRAST:
            break
    return best.astype(np.uint8)


def draw_layers(rng: np.random.Generator, image_size: int = 64, *, classes: int = len(CLASS_NAMES),
                keep_out=None) -> DemoLayers:
    """Draws one example as separate layers (see :func:`draw_example`).

    Args:
        rng: the random stream; the layers depend on nothing else.
        image_size: side ``S`` of the square image, at least 32.
        classes: how many shapes of :data:`SHAPE_NAMES` the label is drawn from (2 to 8).
        keep_out: ``(y0, x0, y1, x1)``, a box the object stays at least a pixel
            away from (a shortcut mark goes there), or None.

    Returns:
        A :class:`DemoLayers`; ``.composite()`` is the image.

    Example:

    >>> layers = draw_layers(np.random.default_rng(0), 64)
    >>> image = layers.composite()
    >>> bool((image != layers.background).any(axis=-1)[~layers.mask].any())
    False
    """
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"'image_size' must be an integer >= 32; got {image_size!r}.")
    if not 2 <= classes <= len(SHAPE_NAMES):
        raise ValueError(f"'classes' must be between 2 and {len(SHAPE_NAMES)}; got {classes!r}.")
    background = _draw_background(rng, image_size)
    label = int(rng.integers(classes))
    area = rng.uniform(*AREA_SHARE_RANGE) * image_size * image_size
    size, bounding_radius = _size_for_area(label, area)
    angle = rng.uniform(0, 2 * math.pi)
    # Keep a pixel of margin so the whole object is inside the image.
    low, high = bounding_radius + 1.0, image_size - bounding_radius - 1.0
    centre = rng.uniform(low, high, size=2)
    # Redraw the place while the object would touch the mark's box: the mark
    # must never hide the object (the mask stays exactly the object's pixels).
    for _ in range(200):
        if keep_out is None or not boxes_touch(keep_out, centre, bounding_radius):
            break
        centre = rng.uniform(low, high, size=2)
    else:
        raise ValueError(f"no place for the object away from the box {keep_out!r} in a {image_size}-pixel image.")
    rows, cols = _pixel_grid(image_size)
    mask = _shape_mask(label, centre, size, angle, rows, cols)
    colour = _contrasting_colour(rng, background[mask])
    return DemoLayers(background=background, mask=mask, colour=colour, label=label)


def draw_example(rng: np.random.Generator, image_size: int = 64, **options) -> tuple[np.ndarray, np.ndarray, int]:
    """Draws one demo image, its object mask and its label.

    Args:
        rng: a ``numpy.random.Generator``; the same stream state gives the same example.
        image_size: side ``S`` of the square image, at least 32.
        **options: ``classes`` and ``keep_out`` of :func:`draw_layers`.

    Returns:
        ``(image uint8 [S, S, 3], mask bool [S, S], label int)``: the mask is
        exactly the object's pixels, the label its class in :data:`CLASS_NAMES`.

    Example:

    >>> image, mask, label = draw_example(np.random.default_rng(7), 64)
    >>> image.shape, mask.dtype, CLASS_NAMES[label] in CLASS_NAMES
    ((64, 64, 3), dtype('bool'), True)
    """
    layers = draw_layers(rng, image_size, **options)
    return layers.composite(), layers.mask, layers.label
