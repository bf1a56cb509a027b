"""Counterfactual confirmation: does the region cause the class, or does it only look like it?

A saliency hint becomes evidence when changing the region changes the model's
answer, and changing another region of the same size does not:

* **remove**: on a bounded sample of the candidate's member images, the region
  is replaced by its surroundings (each channel filled with the median of a
  frame around the box); the measure is the mean drop of the class's
  probability. Control: the same on a random box of the same size elsewhere
  in the same images.
* **paste**: the region's content, taken from the member images, is pasted at
  the same place onto images the model gives to other classes; the measure is
  the share that then flip into the class. Control: content from a random box
  of the same member images pasted at the same place.

The candidate is ``confirmed`` when pasting beats its control by ``margin``
(see :attr:`Outcome.effect`: removing a box that holds the object itself also
drops the class, so the drop decides only when there is nothing to paste
onto). Images are re-read from the records (``source_file`` /
``record_index``) through Beam's filesystems and decoded exactly as the run
decoded them; the changes are made on the model inputs (every preprocessing
mode is per-channel affine, so a fill or a copy there is one in pixels too).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

#: How much an effect must beat its control to confirm a candidate.
DEFAULT_MARGIN = 0.2
#: Model input values per forward batch (4 MiB of float32): 85 images of 64x64x3, 8 of 224x224x3 (8 at least).
_BATCH_VALUES = 1 << 20


@dataclasses.dataclass
class Outcome:
    """What the counterfactuals measured for one candidate.

    Attributes:
        drop: mean drop of the class's probability with the region removed.
        drop_control: the same with a random region of the same size removed.
        flip: share of other-class images that flip into the class with the region pasted.
        flip_control: the same with random regions' content pasted.
        members_tested, others_tested: images used.
        confirmed: whether an effect beats its control by the margin; None when nothing could be tested.
    """

    drop: float | None
    drop_control: float | None
    flip: float | None
    flip_control: float | None
    members_tested: int
    others_tested: int
    confirmed: bool | None

    @property
    def effect(self) -> float | None:
        """The effect that decides: (flip − control) when there were other images to paste onto, else
        (drop − control); None without either.

        Removing a region that holds the object itself (members whose object
        happens to sit there) also drops the class's probability, so the drop
        cannot tell a shortcut from the object. A shortcut is a mark that moves
        the prediction wherever it is: pasted onto images of other classes, it
        pulls them into the class (the Clever Hans test).
        """
        if self.flip is not None and self.flip_control is not None:
            return self.flip - self.flip_control
        if self.drop is not None and self.drop_control is not None:
            return self.drop - self.drop_control
        return None


def read_images(samples: list, decode_settings) -> dict:
    """The model inputs of sampled maps' records, re-read and decoded as the run did.

    Args:
        samples: objects with ``key``, ``source_file`` and ``record_index``.
        decode_settings: the run's :class:`transforms.decode.decode.DecodeSettings`.

    Returns:
        ``{key: float32 [H, W, C]}`` for every record that could be read and
        decoded with its key unchanged (a file changed since the run is skipped).
    """
    from apache_beam.io.filesystems import FileSystems

    from transforms.decode.decode import Example, decode_batch
    from transforms.read.records import Record, read_records

    wanted = collections.defaultdict(dict)  # file -> record index -> key
    for sample in samples:
        wanted[sample.source_file][int(sample.record_index)] = sample.key
    images = {}
    for path, indices in wanted.items():
        found, last = [], max(indices)
        try:
            with FileSystems.open(path) as handle:
                for item in read_records(handle, path):
                    if isinstance(item, Record) and item.record_index in indices:
                        found.append(item)
                    if item.record_index is not None and item.record_index >= last:
                        break
        except Exception:  # noqa: BLE001 - a file gone or damaged since the run: its records are not tested
            continue
        for item, example in zip(found, decode_batch(found, decode_settings)):
            if isinstance(example, Example) and example.key == indices[item.record_index]:
                images[example.key] = example.image
    return images


class Probabilities:
    """The model's class probabilities (softmax of its pre-softmax scores), in batches.

    Run eagerly: a few hundred images per candidate do not repay tracing the
    model into a graph (about a second for a small CNN, more for a large model).
    """

    def __init__(self, model):
        from transforms.engine.scores import score_function

        self._scores, _ = score_function(model, logits=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[n, H, W, C]`` → ``[n, classes]``."""
        import tensorflow as tf

        batch = max(8, min(256, _BATCH_VALUES // max(1, int(np.prod(images.shape[1:])))))
        parts = [tf.nn.softmax(tf.cast(self._scores(tf.constant(images[start:start + batch])), tf.float32),
                               axis=-1).numpy() for start in range(0, len(images), batch)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


#: A pixel belongs to a recurring pattern when its variance over the members is below this share of its
#: variance over other classes' images (the same content at the same place in the members).
RECURRING_RATIO = 0.3
#: A region holds a recurring pattern when at least this many of its pixels do, and this share of them.
RECURRING_PIXELS = 9
RECURRING_SHARE = 0.05
#: Fewer member images than this cannot tell a pattern from chance.
RECURRING_MEMBERS = 8


@dataclasses.dataclass
class Recurrence:
    """Whether the members carry the same content in the region (a mark) or not (objects that sit there).

    Attributes:
        pixels: region pixels whose variance over the members is below :data:`RECURRING_RATIO` of their
            variance over other classes' images.
        area: the region's pixels.
        members: member images compared.
        recurring: whether the region holds a recurring pattern; None with fewer than
            :data:`RECURRING_MEMBERS` members or no other image.
    """

    pixels: int
    area: int
    members: int
    recurring: bool | None


def recurrence(members: np.ndarray, others: np.ndarray, box: list) -> Recurrence:
    """Per pixel of ``box``, the members' variance against other classes' images' variance (channels summed).

    A shortcut is a recurring visual pattern at a fixed place: a tag, a
    watermark, a ruler. Where it is, the members' pixels hardly vary (the same
    mark in every image) while other images' pixels vary as usual. A region
    that holds the class's objects (members whose object happens to sit there)
    varies at least as much as elsewhere.
    """
    y0, x0, y1, x1 = box
    area = max(0, y1 - y0) * max(0, x1 - x0)
    if len(members) < RECURRING_MEMBERS or not len(others) or not area:
        return Recurrence(pixels=0, area=area, members=len(members), recurring=None)
    member_variance = np.asarray(members, np.float64)[:, y0:y1, x0:x1].var(axis=0).sum(axis=-1)
    other_variance = np.asarray(others, np.float64)[:, y0:y1, x0:x1].var(axis=0).sum(axis=-1)
    low = member_variance < RECURRING_RATIO * np.maximum(other_variance, 1e-12)
    pixels = int(low.sum())
    return Recurrence(pixels=pixels, area=area, members=len(members),
                      recurring=pixels >= max(RECURRING_PIXELS, RECURRING_SHARE * area))


def fill_from_surroundings(images: np.ndarray, box: list) -> np.ndarray:
    """Copies of ``images`` with ``box`` (``[y0, x0, y1, x1]``, pixels) filled per channel by its frame's median."""
    out = np.array(images, np.float32, copy=True)
    y0, x0, y1, x1 = box
    height, width = out.shape[1:3]
    margin = max(2, (max(y1 - y0, x1 - x0) + 1) // 2)
    top, left, bottom, right = max(0, y0 - margin), max(0, x0 - margin), min(height, y1 + margin), min(width, x1 + margin)
    frame = np.ones((bottom - top, right - left), bool)
    frame[y0 - top:y1 - top, x0 - left:x1 - left] = False
    if not frame.any():  # the box covers the image: nothing around it
        frame[:] = True
    surroundings = out[:, top:bottom, left:right][:, frame]  # [n, pixels, C]
    out[:, y0:y1, x0:x1] = np.median(surroundings, axis=1)[:, None, None, :]
    return out


def paste(targets: np.ndarray, sources: np.ndarray, source_box: list, target_box: list) -> np.ndarray:
    """Copies of ``targets`` with ``source_box`` of ``sources`` (cycled) pasted at ``target_box``."""
    out = np.array(targets, np.float32, copy=True)
    sy0, sx0, sy1, sx1 = source_box
    ty0, tx0, ty1, tx1 = target_box
    for index in range(len(out)):
        out[index, ty0:ty1, tx0:tx1] = sources[index % len(sources), sy0:sy1, sx0:sx1]
    return out


def random_box(rng: np.random.Generator, shape: tuple, box: list) -> list:
    """A box of ``box``'s size at a random place of an image of ``shape``, not overlapping ``box`` if it can."""
    height, width = shape
    box_height, box_width = box[2] - box[0], box[3] - box[1]
    for _ in range(100):
        y = int(rng.integers(0, height - box_height + 1))
        x = int(rng.integers(0, width - box_width + 1))
        candidate = [y, x, y + box_height, x + box_width]
        if candidate[2] <= box[0] or candidate[0] >= box[2] or candidate[3] <= box[1] or candidate[1] >= box[3]:
            return candidate
    return candidate


def confirm(target: int, box: list, members: np.ndarray, others: np.ndarray, probabilities, seed: int = 0,
            margin: float = DEFAULT_MARGIN) -> Outcome:
    """Runs the remove and paste counterfactuals of one candidate region.

    Args:
        target: the class.
        box: ``[y0, x0, y1, x1]`` in input pixels.
        members: model inputs of member images ``[n, H, W, C]``.
        others: model inputs of images the model gives to other classes ``[m, H, W, C]``.
        probabilities: ``images -> [n, classes]`` (:class:`Probabilities`).
        seed: for the control regions.
        margin: how much an effect must beat its control.

    Returns:
        The :class:`Outcome`.
    """
    rng = np.random.default_rng(seed)
    drop = drop_control = flip = flip_control = None
    batches = {}  # every changed image goes through the model in one call
    if len(members):
        batches["base"] = members
        batches["removed"] = fill_from_surroundings(members, box)
        batches["removed_control"] = np.stack([
            fill_from_surroundings(members[index:index + 1], random_box(rng, members.shape[1:3], box))[0]
            for index in range(len(members))])
    if len(members) and len(others):
        batches["pasted"] = paste(others, members, box, box)
        batches["pasted_control"] = np.stack([paste(others[index:index + 1], members[index % len(members):][:1],
                                                    random_box(rng, members.shape[1:3], box), box)[0]
                                              for index in range(len(others))])
    if batches:
        everything = probabilities(np.concatenate(list(batches.values())))
        ends = np.cumsum([len(images) for images in batches.values()])
        scores = dict(zip(batches, np.split(everything, ends[:-1])))
    if len(members):
        base = scores["base"][:, target]
        drop = float(np.mean(base - scores["removed"][:, target]))
        drop_control = float(np.mean(base - scores["removed_control"][:, target]))
    if len(members) and len(others):
        flip = float(np.mean(np.argmax(scores["pasted"], axis=1) == target))
        flip_control = float(np.mean(np.argmax(scores["pasted_control"], axis=1) == target))
    outcome = Outcome(drop=drop, drop_control=drop_control, flip=flip, flip_control=flip_control,
                      members_tested=len(members), others_tested=len(others), confirmed=None)
    effect = outcome.effect
    outcome.confirmed = None if effect is None else bool(effect >= margin)
    return outcome
