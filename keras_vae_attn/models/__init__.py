"""Model classes: the one-class VAE and FactorVAE."""
from keras_vae_attn.models.vae import VAE, build_vae, load_vae, save_vae

__all__ = ["VAE", "build_vae", "load_vae", "save_vae"]
