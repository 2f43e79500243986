"""Checks that an explanation explains the model it came from.

``sanity``: the model-randomization check (Adebayo et al., NeurIPS 2018) for VAE maps:
a randomized twin of the VAE, the same maps on it, and whether they changed.
``faithfulness``: deletion and insertion curves against the VAE's own anomaly score,
and the selectivity of per-latent maps.
"""
