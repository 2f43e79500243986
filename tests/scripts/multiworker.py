"""One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG set by the caller):
train a VAE for a few steps and save its weights to OUT_DIR/worker-<index>.npz."""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn.models import build_vae

out_dir = sys.argv[1]
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
strategy = tf.distribute.MultiWorkerMirroredStrategy()
keras.utils.set_random_seed(0)
with strategy.scope():
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
initial = [np.asarray(w).copy() for w in model.trainable_weights]
images = np.random.default_rng(0).random((64, 28, 28, 1)).astype("float32")
data = tf.data.Dataset.from_tensor_slices(images).batch(16)
history = model.fit(data, epochs=2, verbose=0)
np.savez(
    os.path.join(out_dir, f"worker-{index}.npz"),
    replicas=strategy.num_replicas_in_sync,
    loss=history.history["loss"],
    moved=sum(
        float(np.abs(np.asarray(w) - i).sum())
        for w, i in zip(model.trainable_weights, initial)
    ),
    **{f"w{i}": np.asarray(w) for i, w in enumerate(model.trainable_weights)},
)
