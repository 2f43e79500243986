"""Train a VAE for one step on N logical CPU replicas and save the updated weights.

    python tests/scripts/one_step.py REPLICAS GLOBAL_BATCH OUT.npz

The log-variance head starts at sigma ~ 1e-13, so the reparameterisation noise is
negligible and runs with different replica counts must reach the same weights.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

from keras_vae_attn.models import build_vae

replicas, global_batch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
)

keras.utils.set_random_seed(0)
devices = [d.name for d in tf.config.list_logical_devices("CPU")]
strategy = tf.distribute.MirroredStrategy(devices)
with strategy.scope():
    model = build_vae("small", (28, 28, 1), 4, filters=(8, 16), dense_units=32)
    logvar = model.encoder.get_layer("logvar")
    logvar.kernel.assign(tf.zeros_like(logvar.kernel))
    logvar.bias.assign(tf.fill(logvar.bias.shape, -60.0))
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
images = np.random.default_rng(0).random((global_batch, 28, 28, 1)).astype("float32")
data = tf.data.Dataset.from_tensor_slices(images).batch(global_batch)
history = model.fit(data, epochs=1, verbose=0)
np.savez(
    out,
    loss=history.history["loss"][0],
    **{f"w{i}": np.asarray(w) for i, w in enumerate(model.trainable_weights)},
)
print("replicas", strategy.num_replicas_in_sync)
