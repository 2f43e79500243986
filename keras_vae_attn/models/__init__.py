"""Model classes: the one-class VAE and FactorVAE, and their saving/loading."""

from keras_vae_attn.models.io import load_vae, save_vae
from keras_vae_attn.models.vae import VAE, build_vae

__all__ = ["VAE", "build_vae", "load_vae", "save_vae"]
