"""Parallelism applied from outside to a built model (models/ and moe/ never import torch.distributed)."""
