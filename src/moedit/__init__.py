"""moedit: Mixture-of-Experts Diffusion Transformers — train, sample, convert and diagnose."""

__version__ = "0.1.0"
