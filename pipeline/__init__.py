"""fpdiff: score-based diffusion models with the FP-Diffusion score Fokker-Planck regularizer."""
__version__ = "0.1.0"
