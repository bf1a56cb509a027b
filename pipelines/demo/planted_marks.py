"""Shortcut marks: small fixed stamps pasted at a fixed place (pure numpy).

A planted shortcut ("Clever Hans") is a mark that most images of one class
carry and the others do not: a model can then predict the class from the mark
instead of the object. The marks here are fixed stamps (the same pixels every
time, so a model can learn them) of four kinds:

* ``patch``: a filled square of one saturated colour;
* ``ring``: a "©"-like tag, a light ring with a C inside, drawn over the image
  (the pixels between the strokes stay the image's own);
* ``barcode``: dark bars of a fixed width pattern on a light label;
* ``glyph``: a block of small dark "text" on a light label.

Every stamp fills a ``size x size`` box; :func:`mark_box` places that box in a
corner (two pixels off the border, like a watermark) or at any ``(y, x)``.
Boxes are ``(y0, x0, y1, x1)`` in pixels, end exclusive.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.audit.regions import box_iou  # noqa: F401 - the planted box against a finding's region

MARK_KINDS = ("patch", "ring", "barcode", "glyph")
PLACES = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
# Corner marks keep this many pixels to the border, as watermarks do.
CORNER_MARGIN = 2
PATCH_COLOUR = (255, 0, 255)
LIGHT, DARK = (250, 250, 250), (10, 10, 10)
# The bar widths of the barcode, cycled across the box: bars and gaps alternate.
_BAR_WIDTHS = (1, 1, 2, 1, 1, 3, 1, 2, 2, 1)


def default_mark_size(image_size: int) -> int:
    """The mark side for an image side: an eighth of it, at least 5 pixels (8 for 64)."""
    return max(5, int(image_size) // 8)


def parse_place(text: str):
    """A place from the command line: one of :data:`PLACES`, or ``"Y,X"`` (the box's top-left pixel).

    Args:
        text: the option's value.

    Returns:
        The place name, or a ``(y, x)`` tuple of ints.
    """
    if text in PLACES:
        return text
    try:
        y, x = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"a place is one of {', '.join(PLACES)} or 'Y,X'; got {text!r}.") from None
    return (y, x)


def mark_box(place, image_size: int, size: int) -> tuple[int, int, int, int]:
    """The box a mark of side ``size`` covers at ``place`` in an ``image_size`` square image.

    Args:
        place: one of :data:`PLACES` (corners keep :data:`CORNER_MARGIN` pixels
            to the border) or ``(y, x)``, the box's top-left pixel.
        image_size: side of the square image.
        size: side of the square mark.

    Returns:
        ``(y0, x0, y1, x1)``, end exclusive, inside the image.

    Example:

    >>> mark_box("bottom-right", 64, 8)
    (54, 54, 62, 62)
    """
    if not 3 <= size <= image_size:
        raise ValueError(f"'size' must be between 3 and the image side {image_size}; got {size!r}.")
    far = image_size - size - CORNER_MARGIN
    corners = {"top-left": (CORNER_MARGIN, CORNER_MARGIN), "top-right": (CORNER_MARGIN, far),
               "bottom-left": (far, CORNER_MARGIN), "bottom-right": (far, far),
               "centre": ((image_size - size) // 2, (image_size - size) // 2)}
    if isinstance(place, str):
        if place not in corners:
            raise ValueError(f"'place' must be one of {', '.join(PLACES)} or (y, x); got {place!r}.")
        y0, x0 = corners[place]
    else:
        y0, x0 = (int(value) for value in place)
    if not (0 <= y0 <= image_size - size and 0 <= x0 <= image_size - size):
        raise ValueError(f"a {size}x{size} mark at {place!r} does not fit in a {image_size}x{image_size} image.")
    return (y0, x0, y0 + size, x0 + size)


def _ring(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The "©" tag: a ring and a C (an arc open to the right), light strokes only."""
    centres = np.arange(size) + 0.5
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    radius = np.hypot(rows - size / 2, cols - size / 2)
    width = max(0.5, size / 10)
    outer = np.abs(radius - (size / 2 - width - 0.25)) <= width
    angle = np.degrees(np.arctan2(rows - size / 2, cols - size / 2))
    inner = (np.abs(radius - size / 4.5) <= max(0.5, width * 0.8)) & (np.abs(angle) >= 50)
    alpha = outer | inner
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[alpha] = LIGHT
    return pixels, alpha


def _barcode(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark vertical bars of a fixed width pattern on a light label (opaque)."""
    pixels = np.full((size, size, 3), LIGHT, np.uint8)
    column, dark, widths = 1, True, iter(_BAR_WIDTHS * (size // len(_BAR_WIDTHS) + 1))
    while column < size - 1:
        width = next(widths)
        if dark:
            pixels[1:size - 1, column:min(column + width, size - 1)] = DARK
        column, dark = column + width, not dark
    return pixels, np.ones((size, size), bool)


def _glyph(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lines of small dark "letters" on a light label (opaque): 2-pixel-high lines, a blank row between."""
    pixels = np.full((size, size, 3), LIGHT, np.uint8)
    # A fixed pattern (not a random one: the mark must be the same in every process and version).
    letters = [(index * 7 + line * 3) % 5 for line in range(size) for index in range(size)]
    for line, top in enumerate(range(1, size - 2, 3)):
        for column in range(1, size - 1):
            code = letters[line * size + column]
            if code != 0:  # a gap between "words"
                pixels[top, column] = DARK
            if code in (1, 3):
                pixels[top + 1, column] = DARK
    return pixels, np.ones((size, size), bool)


def draw_mark(kind: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The stamp of a mark kind.

    Args:
        kind: one of :data:`MARK_KINDS`.
        size: side of the square stamp in pixels, at least 3.

    Returns:
        ``(pixels uint8 [size, size, 3], alpha bool [size, size])``: where
        ``alpha`` is True the mark replaces the image's pixel.
    """
    if size < 3:
        raise ValueError(f"'size' must be >= 3; got {size!r}.")
    if kind == "patch":
        return np.full((size, size, 3), PATCH_COLOUR, np.uint8), np.ones((size, size), bool)
    if kind == "ring":
        return _ring(size)
    if kind == "barcode":
        return _barcode(size)
    if kind == "glyph":
        return _glyph(size)
    raise ValueError(f"'kind' must be one of {', '.join(MARK_KINDS)}; got {kind!r}.")


def apply_mark(image: np.ndarray, kind: str, box) -> np.ndarray:
    """A copy of ``image`` with the mark ``kind`` pasted into ``box``.

    Args:
        image: ``uint8 [H, W, 3]`` (or a batch ``[N, H, W, 3]``: every image gets the mark).
        kind: one of :data:`MARK_KINDS`.
        box: ``(y0, x0, y1, x1)`` of a square, end exclusive.

    Returns:
        The marked copy; pixels outside ``box`` are unchanged.
    """
    y0, x0, y1, x1 = (int(value) for value in box)
    if y1 - y0 != x1 - x0:
        raise ValueError(f"a mark's box is square; got {box!r}.")
    pixels, alpha = draw_mark(kind, y1 - y0)
    marked = np.array(image, copy=True)
    region = marked[..., y0:y1, x0:x1, :]
    region[..., alpha, :] = pixels[alpha]
    return marked


def boxes_touch(box, centre, radius: float, gap: float = 1.0) -> bool:
    """Whether a disc (``centre`` (row, col), ``radius``) comes within ``gap`` pixels of ``box``."""
    nearest_row = min(max(centre[0], box[0]), box[2])
    nearest_col = min(max(centre[1], box[1]), box[3])
    return math.hypot(centre[0] - nearest_row, centre[1] - nearest_col) < radius + gap
