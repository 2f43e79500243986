"""keras-vae-attn: visually explain variational autoencoders.

Gradient-based attention from a VAE's latent space (Liu et al., CVPR 2020): per-latent
maps, the overall attention map, and the anomaly attention of a test image against the
normal data's latent distribution, for any Keras encoder whose outputs include the
latent mean (and log-variance).

    from keras_vae_attn import VAEAttention, overlay
    explainer = VAEAttention(encoder, layer="conv2")
    maps = explainer.latent_maps(images)        # (B, D, h, w)
    heat = explainer.attention(images)          # (B, H, W)
"""

import importlib

# Imported on first use, so that `keras_vae_attn.runs` (flags, config) loads without
# TensorFlow and a CLI's --help answers at once.
_LAZY = {
    "Explanation": "attention",
    "NormalStats": "explain.latent",
    "VAEAttention": "attention",
    "difference_distribution": "explain.latent",
    "feature_layer_names": "explain.taps",
    "fit_normal_stats": "explain.latent",
    "normalize_maps": "attention",
    "overlay": "viz",
    "ExplainOptions": "explain.options",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"keras_vae_attn.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'keras_vae_attn' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ExplainOptions",
    "Explanation",
    "NormalStats",
    "VAEAttention",
    "difference_distribution",
    "feature_layer_names",
    "fit_normal_stats",
    "normalize_maps",
    "overlay",
]
