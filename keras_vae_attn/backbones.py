"""Encoders and decoders.

Every encoder is a functional ``keras.Model`` mapping images to ``[mu, logvar]``.
Its conv feature maps are layers with stable names ("conv1", "conv2", ... for the small
net; "conv1", "layer1" ... "layer4" for ResNet18), so attention can target any of them
by name. Each named layer is a *cut point*: everything after it depends on it alone,
which lets the attention code run only the part of the network after that layer.
"""

from __future__ import annotations

import math

import keras
from keras import layers


def _stride2_stack(x, conv, widths, kernel_size, prefix):
    """One stride-2 ReLU ``conv`` (Conv2D down, Conv2DTranspose up) per width, named
    ``<prefix>1`` .. ``<prefix>N``: the small encoder and its decoders mirror each other."""
    for index, width in enumerate(widths, start=1):
        x = conv(
            width,
            kernel_size,
            strides=2,
            padding="same",
            activation="relu",
            name=f"{prefix}{index}",
        )(x)
    return x


def small_conv_encoder(
    input_shape, latent_dim, filters=(32, 64), dense_units=256, kernel_size=4, name="encoder"
):
    """A stack of stride-2 convs (named conv1..convN), a dense layer, then mu and logvar.

    Suits 28x28 (2 convs), 64x64 (4 convs, the FactorVAE net) and 100x100 (3 convs).
    """
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = _stride2_stack(inputs, layers.Conv2D, filters, kernel_size, "conv")
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="fc")(x)
    mu = layers.Dense(latent_dim, name="mu")(x)
    logvar = layers.Dense(latent_dim, name="logvar")(x)
    return keras.Model(inputs, [mu, logvar], name=name)


def _crop_to(x, height, width):
    """Crop a decoder output that overshoots the target size (e.g. 104 -> 100)."""
    extra_h, extra_w = x.shape[1] - height, x.shape[2] - width
    if extra_h == 0 and extra_w == 0:
        return x
    return layers.Cropping2D(
        ((extra_h // 2, extra_h - extra_h // 2), (extra_w // 2, extra_w - extra_w // 2)),
        name="crop",
    )(x)


def _dense_stem(output_shape, latent_dim, filters, dense_units):
    """z -> dense -> the smallest feature map of a decoder that upsamples by 2 per filter
    stage: (the z input, that map)."""
    height, width, _ = output_shape
    steps = len(filters)
    start_h, start_w = math.ceil(height / 2**steps), math.ceil(width / 2**steps)
    inputs = keras.Input(shape=(latent_dim,), name="z")
    x = layers.Dense(dense_units, activation="relu", name="fc")(inputs)
    x = layers.Dense(start_h * start_w * filters[-1], activation="relu", name="fc_spatial")(x)
    return inputs, layers.Reshape((start_h, start_w, filters[-1]))(x)


def small_conv_decoder(
    output_shape, latent_dim, filters=(32, 64), dense_units=256, kernel_size=4, name="decoder"
):
    """Mirror of :func:`small_conv_encoder`; outputs logits of the reconstruction."""
    inputs, x = _dense_stem(output_shape, latent_dim, filters, dense_units)
    widths = list(reversed(filters))[1:] + [filters[0]]
    x = _stride2_stack(x, layers.Conv2DTranspose, widths, kernel_size, "deconv")
    x = layers.Conv2D(output_shape[-1], 3, padding="same", name="logits")(x)
    x = _crop_to(x, *output_shape[:2])
    return keras.Model(inputs, x, name=name)


def factorvae_decoder(
    output_shape,
    latent_dim,
    filters=(32, 32, 64, 64),
    dense_units=128,
    kernel_size=4,
    name="decoder",
):
    """The FactorVAE paper's decoder: like :func:`small_conv_decoder`, but the last
    transposed conv outputs the logits itself (no full-resolution conv stack), which
    makes it several times cheaper at 64x64."""
    inputs, x = _dense_stem(output_shape, latent_dim, filters, dense_units)
    widths = list(reversed(filters))[1:]
    x = _stride2_stack(x, layers.Conv2DTranspose, widths, kernel_size, "deconv")
    x = layers.Conv2DTranspose(
        output_shape[-1], kernel_size, strides=2, padding="same", name="logits"
    )(x)
    x = _crop_to(x, *output_shape[:2])
    return keras.Model(inputs, x, name=name)


def _basic_block(x, width, stride, name):
    """ResNet basic block: two 3x3 convs with a (projected) identity shortcut."""
    shortcut = x
    y = layers.Conv2D(
        width, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv_a"
    )(x)
    y = layers.BatchNormalization(name=f"{name}_bn_a")(y)
    y = layers.ReLU(name=f"{name}_relu_a")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv_b")(y)
    y = layers.BatchNormalization(name=f"{name}_bn_b")(y)
    if stride != 1 or shortcut.shape[-1] != width:
        shortcut = layers.Conv2D(
            width, 1, strides=stride, use_bias=False, name=f"{name}_proj"
        )(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return y


def resnet18_encoder(input_shape, latent_dim, widths=(64, 128, 256, 512), name="encoder"):
    """ResNet18 (2-2-2-2 basic blocks) with stage outputs named conv1, layer1..layer4.

    The stage outputs are ReLU layers, so each is a cut point and a non-negative feature
    map, as Grad-CAM style attention expects.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    x = layers.Conv2D(
        widths[0], 7, strides=2, padding="same", use_bias=False, name="stem_conv"
    )(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="conv1")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, width in enumerate(widths, start=1):
        for block in range(2):
            stride = 2 if (block == 0 and stage > 1) else 1
            x = _basic_block(x, width, stride, name=f"layer{stage}_block{block}")
            last = block == 1
            x = layers.ReLU(
                name=f"layer{stage}" if last else f"layer{stage}_block{block}_out"
            )(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    mu = layers.Dense(latent_dim, name="mu")(x)
    logvar = layers.Dense(latent_dim, name="logvar")(x)
    return keras.Model(inputs, [mu, logvar], name=name)


def resnet_decoder(
    output_shape, latent_dim, widths=(256, 128, 64, 32, 32), start=8, name="decoder"
):
    """Upsampling decoder for 256x256-class inputs: dense to start x start, then x2 stages.

    ``widths`` are the stages of a 256-pixel output; smaller outputs need fewer stages and
    keep the *last* ones, so the channels at a given output resolution stay the same and a
    64-pixel decoder costs a fraction of the encoder instead of 4x it.
    """
    height, width, channels = output_shape
    steps = max(1, round(math.log2(height / start)))
    widths = ([widths[0]] * steps + list(widths))[-steps:]
    start_h, start_w = math.ceil(height / 2**steps), math.ceil(width / 2**steps)
    inputs = keras.Input(shape=(latent_dim,), name="z")
    x = layers.Dense(start_h * start_w * widths[0], name="fc")(inputs)
    x = layers.ReLU()(x)
    x = layers.Reshape((start_h, start_w, widths[0]))(x)
    for index, width_out in enumerate(widths, start=1):
        x = layers.Conv2DTranspose(
            width_out, 4, strides=2, padding="same", use_bias=False, name=f"up{index}"
        )(x)
        x = layers.BatchNormalization(name=f"up{index}_bn")(x)
        x = layers.ReLU(name=f"up{index}_relu")(x)
    x = layers.Conv2D(output_shape[-1], 3, padding="same", name="logits")(x)
    x = _crop_to(x, *output_shape[:2])
    return keras.Model(inputs, x, name=name)


BACKBONES = ("small", "resnet18", "factorvae")


def build_backbone(kind, input_shape, latent_dim, filters=None, dense_units=256):
    """Return ``(encoder, decoder)`` for ``kind`` in :data:`BACKBONES`."""
    if kind == "small":
        filters = tuple(filters or default_filters(input_shape))
        return (
            small_conv_encoder(input_shape, latent_dim, filters, dense_units),
            small_conv_decoder(input_shape, latent_dim, filters, dense_units),
        )
    if kind == "resnet18":
        return (
            resnet18_encoder(input_shape, latent_dim),
            resnet_decoder(input_shape, latent_dim),
        )
    if kind == "factorvae":  # Kim & Mnih's dSprites net: the small encoder, lean decoder
        filters = tuple(filters or (32, 32, 64, 64))
        return (
            small_conv_encoder(input_shape, latent_dim, filters, dense_units),
            factorvae_decoder(input_shape, latent_dim, filters, dense_units),
        )
    raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")


def backbone_spec(kind, input_shape, latent_dim, filters=None, dense_units=256):
    """The arguments of :func:`build_backbone` as a plain dict, the part of a model's
    saved spec that rebuilds its encoder and decoder."""
    return dict(
        backbone=kind,
        input_shape=list(input_shape),
        latent_dim=int(latent_dim),
        filters=list(filters) if filters else None,
        dense_units=int(dense_units),
    )


def default_filters(input_shape):
    """Conv widths by input size: 28 -> 2 convs, 64 -> 4 (FactorVAE), 100 -> 3 (UCSD)."""
    size = min(input_shape[:2])
    if size <= 32:
        return (32, 64)
    if size <= 64:
        return (32, 32, 64, 64)
    return (32, 64, 128)
