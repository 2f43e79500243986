"""A generated category in the MVTec AD folder layout.

The generated categories draw their images each their own way; their common settings,
and the folders, file names and encodings the reader expects (see
:mod:`keras_vae_attn.data.mvtec`), are written here once.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from keras_vae_attn.data.synthetic.cache import write_once


def category_spec(size, n_train, n_test_good, n_test_defect, defects, known):
    """The settings every generated category stores in its spec, in their order; defect
    kinds not in ``known`` are refused."""
    unknown = sorted(set(defects) - set(known))
    if unknown:
        raise ValueError(f"unknown defect kinds {unknown}; choose from {known}")
    return dict(
        size=int(size),
        n_train=int(n_train),
        n_test_good=int(n_test_good),
        n_test_defect=int(n_test_defect),
        defects=list(defects),
    )


def save_image(image, path, grayscale=False):
    """``image`` (float, [0, 1]) as an 8-bit file, RGB or converted to grey."""
    picture = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    (picture.convert("L") if grayscale else picture).save(path)


def write_category(root, category, spec, normal, defective, exist_ok=True):
    """Write ``<root>/<category>`` once for ``spec`` (see
    :func:`~keras_vae_attn.data.synthetic.cache.write_once`); return its path.

    One random stream seeded with ``spec["seed"]`` draws, in this order, the train and
    the good test images (``normal(rng, size)``), then per defect kind its (image, bool
    mask) pairs (``defective(rng, size, kind)``): the same spec writes the same files.
    ``spec["grayscale"]``, when set, stores the images in grey.
    """

    def write_into(folder, spec):
        rng = np.random.default_rng(spec["seed"])
        size, grayscale = spec["size"], spec.get("grayscale", False)
        for split, count in (("train", spec["n_train"]), ("test", spec["n_test_good"])):
            good = os.path.join(folder, split, "good")
            os.makedirs(good)
            for index in range(count):
                save_image(
                    normal(rng, size), os.path.join(good, f"{index:03d}.png"), grayscale
                )
        for kind in spec["defects"]:
            images = os.path.join(folder, "test", kind)
            masks = os.path.join(folder, "ground_truth", kind)
            os.makedirs(images)
            os.makedirs(masks)
            for index in range(spec["n_test_defect"]):
                image, mask = defective(rng, size, kind)
                save_image(image, os.path.join(images, f"{index:03d}.png"), grayscale)
                Image.fromarray(mask.astype(np.uint8) * 255).save(
                    os.path.join(masks, f"{index:03d}_mask.png")
                )

    return write_once(root, category, spec, write_into, exist_ok)
