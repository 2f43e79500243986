"""A generated MVTec-style category whose defects are wrong combinations of normal parts.

Every image is a light grey card with a thin divider down the middle. Each half has four
slots (two columns, two rows); a normal image fills the same number ``n`` (1 to 4) of
randomly chosen slots on both halves, discs on one half and squares on the other (which
half holds which is drawn per image, so a mirrored normal image is still normal), all in
one colour drawn per image from a small palette. Parts are jittered a little in their
slots. The defects break one rule of the whole image and nothing else:

    count   one half has one part more or one fewer than the other (mask: the extra
            part, or the empty footprint of the missing one)
    swap    a disc and a square have exchanged halves, so both halves are mixed (mask:
            both parts where they now stand)
    colour  one part has another palette colour than the rest (mask: that part)

Every part of a defective image has a kind, a colour and a place that normal images show
at that slot, so statistics of single positions (a per-pixel Gaussian, a per-position
feature distribution with a small receptive field) cannot tell defects from normal
images; only a model of the whole image can. The palette's colours are the three
permutations of one (high, low, low) triple on a grey card, so every colour deviates
equally from the per-pixel normal mean: even the per-pixel z-score of the odd part is no
larger than a normal part's.

Files are written in the official layout (see :mod:`keras_vae_attn.data.mvtec`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from keras_vae_attn.data.synthetic.mvtec_layout import category_spec, write_category

DEFECTS = ("count", "swap", "colour")
KINDS = ("disc", "square")
SLOTS = 4
BACKGROUND = 0.88
DIVIDER = 0.35
PALETTE = ((0.85, 0.2, 0.2), (0.2, 0.85, 0.2), (0.2, 0.2, 0.85))
# Geometry as fractions of the image size: slot centres of the left half (the right half
# mirrors them), the parts' radius and their jitter in x and y.
COLUMNS, ROWS = (0.14, 0.36), (0.27, 0.73)
RADIUS, JITTER = 0.085, (0.015, 0.04)
SQUARE = 0.89  # a square's half-side in radii: about a disc's area
SUPERSAMPLE = 4  # parts are drawn 4x larger and averaged down: soft, exact edges
NOISE = 0.01


class Part(NamedTuple):
    """One drawn part: its half (0 left, 1 right), slot, kind, palette colour, and its
    centre in fractions of the image size."""

    side: int
    slot: int
    kind: str
    colour: int
    x: float
    y: float


def _part(rng, side, slot, kind, colour):
    """A part at ``slot`` of ``side`` with a fresh jitter."""
    x = COLUMNS[slot % 2] + rng.uniform(-1, 1) * JITTER[0]
    y = ROWS[slot // 2] + rng.uniform(-1, 1) * JITTER[1]
    return Part(side, slot, kind, colour, 1.0 - x if side else x, y)


def _normal_layout(rng, counts=(1, 2, 3, 4)):
    """The parts of one normal image, ``n`` drawn from ``counts``."""
    n = int(rng.choice(counts))
    left = int(rng.integers(2))
    colour = int(rng.integers(len(PALETTE)))
    return [
        _part(rng, side, int(slot), KINDS[left ^ side], colour)
        for side in (0, 1)
        for slot in sorted(rng.choice(SLOTS, n, replace=False))
    ]


def _defective_layout(rng, kind):
    """(parts, the parts the mask covers) of one image with defect ``kind``."""
    if kind == "count":
        parts = _normal_layout(rng)
        side = int(rng.integers(2))
        mine = [p for p in parts if p.side == side]
        grow = len(mine) == 1 or (len(mine) < SLOTS and rng.uniform() < 0.5)
        if grow:
            free = sorted(set(range(SLOTS)) - {p.slot for p in mine})
            extra = _part(rng, side, int(rng.choice(free)), mine[0].kind, mine[0].colour)
            return parts + [extra], [extra]
        gone = mine[int(rng.integers(len(mine)))]
        return [p for p in parts if p != gone], [gone]
    if kind == "swap":
        parts = _normal_layout(rng, counts=(2, 3, 4))  # with n = 1 a swap is normal
        left = [i for i, p in enumerate(parts) if p.side == 0]
        right = [i for i, p in enumerate(parts) if p.side == 1]
        i, j = int(rng.choice(left)), int(rng.choice(right))
        parts[i], parts[j] = (
            parts[i]._replace(kind=parts[j].kind),
            parts[j]._replace(kind=parts[i].kind),
        )
        return parts, [parts[i], parts[j]]
    if kind == "colour":
        parts = _normal_layout(rng)
        i = int(rng.integers(len(parts)))
        others = [c for c in range(len(PALETTE)) if c != parts[i].colour]
        parts[i] = parts[i]._replace(colour=int(rng.choice(others)))
        return parts, [parts[i]]
    raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")


def _shape(draw, part, scale, fill):
    """Draw ``part`` on a canvas ``scale`` pixels wide."""
    x, y, r = part.x * scale, part.y * scale, RADIUS * scale
    if part.kind == "disc":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        h = r * SQUARE
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)


def _render(rng, parts, size):
    """float32 (size, size, 3) in [0, 1]: the card, its divider and ``parts``."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (round(BACKGROUND * 255),) * 3)
    draw = ImageDraw.Draw(canvas)
    half, width = big / 2, max(1, size // 64) * SUPERSAMPLE
    draw.rectangle(
        [half - width / 2, 0, half + width / 2 - 1, big], fill=(round(DIVIDER * 255),) * 3
    )
    for part in parts:
        _shape(draw, part, big, tuple(round(c * 255) for c in PALETTE[part.colour]))
    image = np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0
    return np.clip(image + rng.normal(0, NOISE, image.shape), 0, 1).astype(np.float32)


def _mask(parts, size):
    """bool (size, size): every pixel the footprints of ``parts`` touch."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for part in parts:
        _shape(draw, part, big, 255)
    return np.asarray(canvas.resize((size, size), Image.BOX)) > 0


def write_logical_category(
    root,
    category="logical",
    size=64,
    n_train=200,
    n_test_good=20,
    n_test_defect=15,
    defects=DEFECTS,
    seed=0,
    exist_ok=True,
):
    """Write ``<root>/<category>`` in the MVTec AD layout; return its path.

    Deterministic from ``seed``; written atomically and reused while its settings match,
    like the demo's category (:func:`write_mvtec_category`).
    """
    spec = dict(
        generator="logical",
        **category_spec(size, n_train, n_test_good, n_test_defect, defects, DEFECTS),
        seed=int(seed),
    )
    return write_category(root, category, spec, _normal_image, _defective_image, exist_ok)


def _normal_image(rng, size):
    return _render(rng, _normal_layout(rng), size)


def _defective_image(rng, size, kind):
    parts, marked = _defective_layout(rng, kind)
    return _render(rng, parts, size), _mask(marked, size)
