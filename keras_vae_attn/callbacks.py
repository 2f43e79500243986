"""Keras callbacks that show attention while training."""
from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn import viz


class AttentionImages(keras.callbacks.Callback):
    """Write input | reconstruction | attention overlay for a few fixed images to
    TensorBoard at the end of each epoch, so maps can be watched forming."""

    def __init__(self, images, log_dir, layer="last", every=1):
        super().__init__()
        self.images = np.asarray(images, np.float32)
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "attention"))
        self.layer = layer
        self.every = max(1, int(every))

    def on_epoch_end(self, epoch, logs=None):
        if epoch % self.every:
            return
        maps = self.model.explainer(self.layer).attention(self.images).numpy()
        recon = self.model(self.images).numpy()
        panel = np.concatenate([viz.to_rgb(self.images), viz.to_rgb(recon),
                                viz.overlay(self.images, maps) / 255.0], axis=2)
        with self.writer.as_default():
            tf.summary.image("input|reconstruction|attention", panel, step=epoch,
                             max_outputs=len(panel))
        self.writer.flush()
