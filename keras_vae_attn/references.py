"""Model-free reference maps every localization result is shown beside.

A VAE's attention adds something only if it beats maps that need no model: the
difference from the mean normal image, and the per-pixel normal distribution
|x - mean| / std (a one-Gaussian-per-pixel detector). Both are fitted on the normal
training images, streamed, and work on uint8 or float images in [0, 1].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from keras_vae_attn.explain.deviation import STD_FLOOR, FeatureMoments

MEAN_IMAGE = "mean_image_difference"
PIXEL_DEVIATION = "pixel_deviation"


class PixelDistribution(NamedTuple):
    """Per-pixel, per-channel mean and std of the normal images, (H, W, C) float32."""

    mean: np.ndarray
    std: np.ndarray


def _as_float(images):
    images = np.asarray(images)
    return (
        images.astype(np.float32) / 255.0
        if images.dtype == np.uint8
        else images.astype(np.float32)
    )


def fit_pixel_distribution(images, batch_size=256):
    """Mean and std of ``images`` (N, H, W, C), in batches (no float copy of them all)."""
    moments = FeatureMoments()
    for start in range(0, len(images), batch_size):
        moments.update(_as_float(images[start : start + batch_size]))
    return PixelDistribution(*moments.result())


def mean_image_difference(images, distribution):
    """|x - mean normal image|, mean over channels: (N, H, W)."""
    return np.abs(_as_float(images) - distribution.mean).mean(axis=-1)


def pixel_deviation(images, distribution):
    """sqrt(mean_c z_c^2), z = (x - mean) / std per pixel and channel: (N, H, W). The std
    is floored at STD_FLOOR of its mean, so a pixel that never varied stays finite."""
    std = distribution.std
    floor = STD_FLOOR * float(std.mean()) + 1e-6
    z = (_as_float(images) - distribution.mean) / np.sqrt(std**2 + floor**2)
    return np.sqrt((z**2).mean(axis=-1))


def reference_maps(images, distribution):
    """{name: (N, H, W)} of both model-free references."""
    return {
        MEAN_IMAGE: mean_image_difference(images, distribution),
        PIXEL_DEVIATION: pixel_deviation(images, distribution),
    }
