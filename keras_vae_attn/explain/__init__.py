"""How a VAE's maps are made, and checks that they explain the model they came from.

Making a map, in the order the data flows:

``options``      ExplainOptions: how a map is made, one spelling from CLI flag to graph
``taps``         reading a layer's features (functional split, tapped output, call hook)
``gradients``    the stack / jacobian / path gradient engines and the anomaly targets
``latent``       the normal latent statistics and the Eq. 5 energy
``deviation``    a layer's normal feature distribution and the deviations against it
``forms``        the attribution forms: a new form is one ``Form`` subclass there
``pipeline``     explain_anomaly: the one function trainers, metrics and exports call

Checking a map:

``sanity``       the model-randomization check (Adebayo et al., NeurIPS 2018): a
                 randomized twin of the VAE, the same maps on it, and whether they changed
``faithfulness`` deletion and insertion curves against the VAE's own anomaly score, and
                 the selectivity of per-latent maps
``figures``      the checks' figures
"""
