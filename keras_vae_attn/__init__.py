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
from keras_vae_attn.attention import (
    Explanation,
    NormalStats,
    VAEAttention,
    difference_distribution,
    feature_layer_names,
    fit_normal_stats,
    normalize_maps,
)
from keras_vae_attn.viz import overlay

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "NormalStats",
    "VAEAttention",
    "difference_distribution",
    "feature_layer_names",
    "fit_normal_stats",
    "normalize_maps",
    "overlay",
]
