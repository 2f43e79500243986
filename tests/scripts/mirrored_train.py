"""Train one model kind for a few steps under MirroredStrategy on 2 logical CPUs and
print its final logs as JSON.

    python tests/scripts/mirrored_train.py {vae,factor_vae,ad_factor_vae}
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

kind = sys.argv[1]
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(
    [d.name for d in tf.config.list_logical_devices("CPU")]
)
with strategy.scope():
    if kind == "vae":
        from keras_vae_attn.models import build_vae

        model = build_vae("small", (32, 32, 1), 4, filters=(8, 16), dense_units=32)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
    else:
        from keras_vae_attn.models.factor_vae import build_factor_vae

        model = build_factor_vae(
            input_shape=(32, 32, 1),
            latent_dim=4,
            filters=(8, 8, 16, 16),
            dense_units=32,
            d_units=32,
            d_depth=2,
            lambda_ad=1.0 if kind == "ad_factor_vae" else 0.0,
        )
        model.compile()
images = (np.random.default_rng(0).random((32, 32, 32, 1)) > 0.7).astype("float32")
history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(8), epochs=2, verbose=0)
print(
    json.dumps(
        {
            "replicas": strategy.num_replicas_in_sync,
            **{k: [float(x) for x in v] for k, v in history.history.items()},
        }
    )
)
