"""Saving and loading models: a spec (``model.json``) plus Keras weights, rebuilt through
a ``{class name: builder}`` registry so the base class never imports its subclasses."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from keras_vae_attn.runs import ModelLoadError, publish, remove_stale, staging_path

MODEL_SPEC = "model.json"
MODEL_WEIGHTS = "model.weights.h5"


def _builders():
    """{class name stored in model.json: function(**spec) -> model}. A new model class
    adds one line here."""
    from keras_vae_attn.models.factor_vae import build_factor_vae
    from keras_vae_attn.models.vae import build_vae

    return {"VAE": build_vae, "FactorVAE": build_factor_vae}


def save_vae(model: Any, directory: str) -> None:
    """Write ``model.json`` (spec) and ``model.weights.h5`` into ``directory``, published
    whole: the folder is written as ``<directory>.partial-<pid>`` and renamed into place
    (:func:`keras_vae_attn.runs.publish`), so ``directory`` holds the old model or the
    new one, never one's weights beside the other's spec. A kill leaves the staging
    folder, which the next save removes."""
    directory = os.path.normpath(directory)
    remove_stale(directory)
    staging = staging_path(directory)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with open(os.path.join(staging, MODEL_SPEC), "w", encoding="utf-8") as handle:
            json.dump({"class": type(model).__name__, **model.spec}, handle, indent=2)
        model.save_weights(os.path.join(staging, MODEL_WEIGHTS))
        publish(staging, directory, replace=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_vae(directory: str) -> Any:
    """Rebuild the model saved by :func:`save_vae` in ``directory``."""
    spec_path = os.path.join(directory, MODEL_SPEC)
    weights_path = os.path.join(directory, MODEL_WEIGHTS)
    for path in (spec_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!r} holds no trained model: {path} is missing")
    try:
        with open(spec_path, encoding="utf-8") as handle:
            spec = json.load(handle)
        if not isinstance(spec, dict):
            raise ValueError(f"{spec_path} must hold a JSON object, got {type(spec).__name__}")
        model = _build(spec, spec_path)
        model.load_weights(weights_path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        # not JSON, a spec no builder takes (negative latent_dim, unknown class),
        # truncated or foreign weights: one line naming the folder
        reason = " ".join(str(error).split())[:300]
        raise ModelLoadError(
            f"cannot load the model in {directory}: {type(error).__name__}: {reason}"
        ) from None
    return model


def rebuild(model: Any) -> Any:
    """A new build of ``model`` from its spec, holding its weights, under the current dtype
    policy: a model trained under mixed_bfloat16 becomes the float32 model that its saved
    folder loads as (the trainers evaluate and save that one)."""
    copy = build_like(model)
    copy.set_weights(model.get_weights())
    return copy


def build_like(model: Any) -> Any:
    """A new, freshly initialized model of ``model``'s spec (its weights not copied)."""
    return _build({"class": type(model).__name__, **model.spec}, "the model's spec")


def _build(spec, spec_path):
    """The model of a stored spec, its weights not loaded; errors name ``spec_path``."""
    spec = dict(spec)
    kind = spec.pop("class", "VAE")
    feature_layers = spec.pop("feature_layers", [])
    covariance_layers = set(spec.pop("feature_covariance_layers", []))
    builders = _builders()
    if kind not in builders:
        raise ValueError(
            f"{spec_path}: cannot rebuild a saved model of class {kind!r}; "
            f"known: {', '.join(builders)}"
        )
    model = builders[kind](**spec)
    for key in feature_layers:  # the weights must exist before they load
        shape = _distribution_shape(model, key)
        if shape is None:
            raise ValueError(
                f"{spec_path}: cannot rebuild the feature distribution of layer {key!r}"
            )
        model.add_feature_distribution(key, shape, key in covariance_layers)
    return model


def _distribution_shape(model, key):
    """The (h, w, K) shape of a stored distribution: a layer's feature map, the image
    for the pixel residual, the layer's for its feature residual."""
    from keras_vae_attn.models.vae import PIXELS

    if key == PIXELS:
        return tuple(model.encoder.inputs[0].shape[1:])
    layer = key[len("residual_") :] if key.startswith("residual_") else key
    front = model.explainer(layer).front
    return None if front is None else front.output.shape[1:]
