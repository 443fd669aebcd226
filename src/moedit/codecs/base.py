"""The codec contract, and the identity codec (pixel space, moedit's default).

A codec maps images x ∈ [-1, 1]^{C_px×H×W} to the model's space and back:

    encode: z = scale · (E(x) − shift)       E = the encoder's posterior sample, or its mean
    decode: x = clamp(D(z / scale + shift), −1, 1)

and states the shape it produces (`latent_shape`) and the pixel channels it takes, so a run can check
its data against its model before any step runs. Encoding never needs gradients: the codec is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from moedit.config import ConfigError


class CodecError(ConfigError):
    """A codec cannot be built or does not fit the data or model; the message names the fix."""


class Codec(nn.Module):
    name = "codec"
    scale: float = 1.0
    shift: float = 0.0

    def latent_shape(self, channels: int, size: int) -> tuple[int, int]:
        """(latent channels, latent side) of images with `channels` channels of side `size`."""
        raise NotImplementedError

    def pixel_shape(self, channels: int, size: int) -> tuple[int, int]:
        """(image channels, image side) that latents of this shape decode to."""
        raise NotImplementedError

    def check_pixels(self, channels: int, size: int) -> None:
        """Raise CodecError when images of this shape cannot pass through the codec."""

    def encode(self, x_BCHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def moments(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's unscaled posterior (μ, log σ²); a codec without a posterior raises CodecError."""
        raise CodecError(f"codec {self.name!r} has no posterior to store; choose codec.name=autoencoder or diffusers")

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def identity(self) -> str:
        """Which encoder this is (its weights), without where they lie or the scale: a latent store's key."""
        return self.name

    def signature(self) -> str:
        """What decides the decoded images, without where the weights lie (an evaluation's cache key)."""
        return f"{self.identity()} scale {self.scale:g} shift {self.shift:g}" if self.name != "identity" else self.name


class IdentityCodec(Codec):
    """Pixel space: the model sees the images themselves."""

    name = "identity"

    def latent_shape(self, channels: int, size: int) -> tuple[int, int]:
        return channels, size

    def pixel_shape(self, channels: int, size: int) -> tuple[int, int]:
        return channels, size

    def encode(self, x_BCHW, sample: bool = True, generator=None) -> torch.Tensor:
        return x_BCHW

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return z_BCHW.clamp(-1, 1)

    def describe(self) -> str:
        return "identity (pixel space)"
