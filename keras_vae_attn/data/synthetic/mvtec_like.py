"""A small MVTec-AD-style category, generated: the demo's data and the tests' fixture.

Normal images show a round, lit object (a bottle seen from above) on a dark background,
with a faint texture and a little jitter in position, size and brightness. Test images
add drawn defects, each with its exact mask:

    scratch  a thin bright line across the object
    hole     a dark ellipse
    stain    an irregular brown blob, half transparent

Files are written in the official layout (see :mod:`keras_vae_attn.data.mvtec`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from keras_vae_attn.data.synthetic.mvtec_layout import category_spec, write_category

DEFECTS = ("scratch", "hole", "stain")


def _normal(rng, size):
    """One normal image, float32 (size, size, 3) in [0, 1], and the object's (cx, cy, r)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    radius = size * rng.uniform(0.34, 0.38)
    dist = np.hypot(xx - cx, yy - cy) / radius
    body = np.clip(1.0 - dist, 0.0, 1.0) ** 0.35  # lit dome, soft edge
    rim = np.exp(-(((dist - 0.82) / 0.06) ** 2))  # a bright rim
    rings = 0.04 * np.cos(2 * np.pi * dist * 6 + rng.uniform(0, 2 * np.pi))
    grey = 0.12 + (0.5 + rings) * body * rng.uniform(0.9, 1.1) + 0.25 * rim * (dist < 1.2)
    tint = np.array([1.0, 0.97, 0.9], np.float32)  # slightly warm light
    image = grey[..., None] * tint + rng.normal(0, 0.015, (size, size, 3))
    return np.clip(image, 0, 1).astype(np.float32), (float(cx), float(cy), float(radius))


def _point_inside(rng, circle, fraction=0.7):
    cx, cy, radius = circle
    angle, reach = rng.uniform(0, 2 * np.pi), radius * fraction * np.sqrt(rng.uniform())
    return cx + reach * np.cos(angle), cy + reach * np.sin(angle)


def _draw_defect(rng, image, circle, kind):
    """Draw defect ``kind`` on ``image`` (float RGB); return (image, bool mask)."""
    size = image.shape[0]
    canvas = Image.fromarray(np.round(image * 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    shape, mask_draw = ImageDraw.Draw(canvas, "RGBA"), ImageDraw.Draw(mask)
    x, y = _point_inside(rng, circle)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = size * rng.uniform(0.12, 0.2)
        ends = [
            (x - half * np.cos(angle), y - half * np.sin(angle)),
            (x + half * np.cos(angle), y + half * np.sin(angle)),
        ]
        width = max(2, round(size / 48))
        shape.line(ends, fill=(250, 250, 245, 255), width=width)
        mask_draw.line(ends, fill=255, width=width)
    elif kind == "hole":
        rx, ry = size * rng.uniform(0.04, 0.08, 2)
        box = [x - rx, y - ry, x + rx, y + ry]
        shape.ellipse(box, fill=(12, 10, 8, 255))
        mask_draw.ellipse(box, fill=255)
    elif kind == "stain":
        count = 9
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = size * rng.uniform(0.04, 0.09, count)
        points = [(x + r * np.cos(a), y + r * np.sin(a)) for a, r in zip(angles, radii)]
        shape.polygon(points, fill=(140, 80, 30, 190))
        mask_draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECTS}")
    return np.asarray(canvas, np.float32) / 255.0, np.asarray(mask) > 0


def write_mvtec_category(
    root,
    category="demo",
    size=128,
    n_train=60,
    n_test_good=8,
    n_test_defect=6,
    defects=DEFECTS,
    grayscale=False,
    seed=0,
    exist_ok=True,
):
    """Write ``<root>/<category>`` in the MVTec AD layout; return its path.

    The category appears in one rename once complete, so a reader never sees half of it.
    With ``exist_ok`` a category already written with the same settings is reused
    (that is the demo's cache); one written with other settings is replaced.
    """
    spec = dict(
        **category_spec(size, n_train, n_test_good, n_test_defect, defects, DEFECTS),
        grayscale=bool(grayscale),
        seed=int(seed),
    )
    return write_category(root, category, spec, _normal_image, _defective_image, exist_ok)


def _normal_image(rng, size):
    return _normal(rng, size)[0]


def _defective_image(rng, size, kind):
    image, circle = _normal(rng, size)
    return _draw_defect(rng, image, circle, kind)
