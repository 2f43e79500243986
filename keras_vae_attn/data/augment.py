"""Training-time augmentation as Keras layers (the paper's random mirror and rotation)."""

from __future__ import annotations

import keras

MIRRORS = ("none", "horizontal", "vertical", "horizontal_and_vertical")


def augmenter(mirror="horizontal", rotation_degrees=10.0, seed=0):
    """A seeded ``keras.Sequential`` of RandomFlip and RandomRotation.

    Works inside a tf.data ``map`` on float images (B, H, W, C); rotation fills the
    corners by reflection so no black wedges appear that normal data never shows.
    The layers are pinned to float32 so a changed global ``floatx`` cannot leak in.
    """
    if mirror not in MIRRORS:
        raise ValueError(f"unknown mirror {mirror!r}; choose one of {MIRRORS}")
    if rotation_degrees < 0:
        raise ValueError(f"rotation_degrees must be >= 0, got {rotation_degrees}")
    steps = []
    if mirror != "none":
        steps.append(keras.layers.RandomFlip(mirror, seed=seed, dtype="float32"))
    if rotation_degrees:
        steps.append(
            keras.layers.RandomRotation(
                rotation_degrees / 360.0, fill_mode="reflect", seed=seed + 1, dtype="float32"
            )
        )
    return keras.Sequential(steps, name="augment")


def train_dataset(images, batch_size, augment=None, seed=0, shuffle=True):
    """uint8 images (N, H, W, C) in memory -> batches of float32 in [0, 1], augmented.

    Shuffled each epoch with ``seed``; ``augment`` is a Keras model applied per batch
    (e.g. :func:`augmenter`) or None. When shuffling, a last partial batch is dropped
    (BatchNorm statistics of a batch of 1 or 2 images are noise).
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(images)
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    drop = shuffle and len(images) >= batch_size
    dataset = dataset.batch(batch_size, drop_remainder=drop).map(
        lambda x: tf.cast(x, tf.float32) / 255.0, num_parallel_calls=tf.data.AUTOTUNE
    )
    if augment is not None:
        dataset = dataset.map(
            lambda x: tf.cast(augment(x, training=True), tf.float32),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.prefetch(tf.data.AUTOTUNE)
