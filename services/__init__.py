"""ladder: harden image classifiers with latent boundary-guided adversarial training."""

__version__ = "0.1.0"
