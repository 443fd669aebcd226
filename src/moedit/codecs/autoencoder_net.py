"""moedit's own autoencoder: a small convolutional KL autoencoder (docs/LATENT.md, "moedit's autoencoder").

The shape of LDM's KL autoencoder (Rombach et al., arXiv 2112.10752, §3 and appendix G), scaled down for
28×28 data and a 2-core CPU. Levels i = 0..L−1 run at side H/2^i with `channels[i]` feature maps:

    encoder  x (C×H×W) → conv3×3 → [ResBlock × blocks, then a stride-2 conv3×3 except at the last level]
             → GroupNorm, SiLU, conv3×3 → (μ, log σ²), each latent_channels × H/f × W/f,  f = 2^(L−1)
    decoder  z → conv3×3 → [ResBlock × blocks, then nearest ×2 and conv3×3 except at the first level]
             → GroupNorm, SiLU, conv3×3 → x̂ (C×H×W)

    ResBlock(h) = h + conv(SiLU(GN(conv(SiLU(GN(h))))))

The posterior is the diagonal Gaussian q(z|x) = N(μ, σ²) (log σ² clamped to [−30, 20] as LDM does); the
training loss (train/autoencoder.py) is the reconstruction error plus kl_weight · KL(q ‖ N(0, I)), with
no perceptual or adversarial term (those need networks moedit cannot download). No attention: at 7×7
latents the convolutions already see the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(kw_only=True)
class AutoencoderSpec:
    """The architecture; written into the weights' JSON record, so a file alone rebuilds its network."""

    in_channels: int = 1  # image channels (1 for MNIST / Fashion-MNIST, 3 for RGB)
    latent_channels: int = 4
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # per level; downsampling 2^(len−1)
    blocks: int = 1  # residual blocks per level
    groups: int = 8  # GroupNorm groups; must divide every entry of channels

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def problems(self) -> list[str]:
        """Every rule the spec breaks, as `key=value must …` lines (empty: a buildable network)."""
        out = []
        for key in ("in_channels", "latent_channels", "blocks", "groups"):
            if getattr(self, key) < 1:
                out.append(f"{key}={getattr(self, key)} must be at least 1")
        if not self.channels or any(c < 1 for c in self.channels):
            out.append(f"channels={self.channels} must be a non-empty list of positive widths, e.g. [16, 32, 64]")
        elif self.groups >= 1 and any(c % self.groups for c in self.channels):
            out.append(f"groups={self.groups} must divide every entry of channels={self.channels}")
        return out


class ResBlock(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        return h_BCHW + self.body(h_BCHW)


def _head(width: int, out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, out, 3, padding=1))


class Encoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        c, g = spec.channels, spec.groups
        layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, c[0], 3, padding=1)]
        for i, width in enumerate(c):
            layers += [ResBlock(width, g) for _ in range(spec.blocks)]
            if i + 1 < len(c):
                layers.append(nn.Conv2d(width, c[i + 1], 3, stride=2, padding=1))
        layers.append(_head(c[-1], 2 * spec.latent_channels, g))
        self.net = nn.Sequential(*layers)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


class Decoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        c, g = spec.channels, spec.groups
        layers: list[nn.Module] = [nn.Conv2d(spec.latent_channels, c[-1], 3, padding=1)]
        for i in reversed(range(len(c))):
            layers += [ResBlock(c[i], g) for _ in range(spec.blocks)]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c[i], c[i - 1], 3, padding=1)]
        layers.append(_head(c[0], spec.in_channels, g))
        self.net = nn.Sequential(*layers)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(z_BCHW)


class KLAutoencoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec):
        super().__init__()
        problems = spec.problems()
        if problems:
            raise ValueError("autoencoder spec: " + "; ".join(problems))
        self.spec = spec
        self.encoder, self.decoder = Encoder(spec), Decoder(spec)

    def moments(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x), each (B, latent_channels, H/f, W/f)."""
        mean_BCHW, logvar_BCHW = self.encoder(x_BCHW).chunk(2, dim=1)
        return mean_BCHW, logvar_BCHW.clamp(*LOGVAR_RANGE)

    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_BCHW)

    def forward(self, x_BCHW: torch.Tensor, generator: torch.Generator | None = None):
        """(x̂, μ, log σ²) with x̂ decoded from one posterior sample z = μ + σ·ε."""
        mean_BCHW, logvar_BCHW = self.moments(x_BCHW)
        eps_BCHW = torch.randn(mean_BCHW.shape, generator=generator, device=mean_BCHW.device, dtype=mean_BCHW.dtype)
        z_BCHW = mean_BCHW + torch.exp(0.5 * logvar_BCHW) * eps_BCHW
        return self.decode(z_BCHW), mean_BCHW, logvar_BCHW


def kl_to_standard_normal(mean_BCHW: torch.Tensor, logvar_BCHW: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per latent element, averaged: ½ · mean(μ² + σ² − 1 − log σ²)."""
    return 0.5 * (mean_BCHW.pow(2) + logvar_BCHW.exp() - 1.0 - logvar_BCHW).mean()
