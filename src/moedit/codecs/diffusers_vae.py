"""`diffusers`: an AutoencoderKL the user has on disk (SD-VAE's sd-vae-ft-ema / -mse, or any
`AutoencoderKL.save_pretrained` folder), read with `local_files_only` so nothing is ever downloaded.

SD-VAE (Rombach et al., arXiv 2112.10752) maps 3×256×256 images in [-1, 1] to a diagonal Gaussian over
4×32×32 latents; the diffusion papers train on z = 0.18215 · sample (DiT's train.py), 0.18215 being the
`scaling_factor` in the VAE's config.json. The scale and shift default to the VAE's own config values
(`scaling_factor`, `shift_factor` or 0) and are written into the run's config by the trainer.
Optional extra: `pip install 'moedit[diffusers]'` (diffusers==0.42.1; it needs no other torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moedit.codecs.base import Codec, CodecError
from moedit.config import CodecConfig
from moedit.utils.files import file_sha256

INSTALL = "pip install 'moedit[diffusers]' (or pip install diffusers==0.42.1)"


def _load_autoencoder(path: Path):
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise CodecError(f"codec.name=diffusers needs the diffusers package, which is not installed: {INSTALL}") from exc
    if not path.is_dir():
        raise CodecError(f"codec.path={str(path)!r} is not a directory. Point it at a local AutoencoderKL folder "
                         "(config.json and diffusion_pytorch_model.safetensors), e.g. a copy of "
                         "stabilityai/sd-vae-ft-ema fetched once with `huggingface-cli download`; moedit never "
                         "downloads it")
    if not (path / "config.json").is_file():
        raise CodecError(f"{path} has no config.json: not an AutoencoderKL folder (save one with "
                         "AutoencoderKL.save_pretrained, or point codec.path at the vae/ folder of a pipeline)")
    try:
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CodecError(f"{path} could not be read as an AutoencoderKL: {exc}") from exc


class DiffusersCodec(Codec):
    name = "diffusers"

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.path = Path(cfg.path)
        self.vae = _load_autoencoder(self.path).eval().requires_grad_(False)
        config = self.vae.config
        self.scale = float(cfg.scale if cfg.scale is not None else config.scaling_factor)
        self.shift = float(cfg.shift if cfg.shift is not None else (getattr(config, "shift_factor", None) or 0.0))
        self.pixel_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self._identity: str | None = None  # hashing SD-VAE's 335 MB takes a second: once

    def latent_shape(self, channels: int, size: int) -> tuple[int, int]:
        return self.latent_channels, size // self.factor

    def pixel_shape(self, channels: int, size: int) -> tuple[int, int]:
        return self.pixel_channels, size * self.factor

    def check_pixels(self, channels: int, size: int) -> None:
        if channels != self.pixel_channels:
            raise CodecError(f"the data has {channels}-channel images but the autoencoder in {self.path} takes "
                             f"{self.pixel_channels}; use data with {self.pixel_channels} channels or another codec")
        if size % self.factor:
            raise CodecError(f"the data's side {size} is not a multiple of the autoencoder's downsampling factor "
                             f"{self.factor}; set data.image_size to a multiple of {self.factor}")

    @torch.no_grad()
    def moments(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled posterior (μ, log σ²): what a latent store keeps (DiffMoE's `moments`)."""
        posterior = self.vae.encode(x_BCHW.float()).latent_dist
        return posterior.mean, posterior.logvar

    @torch.no_grad()
    def encode(self, x_BCHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(x_BCHW.float()).latent_dist
        latent = posterior.sample(generator) if sample else posterior.mean
        return (latent - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z_BCHW.float() / self.scale + self.shift).sample.clamp(-1, 1)

    def identity(self) -> str:
        """The config and the weight files' sha256 (sd-vae-ft-ema and -mse share one config), not the folder."""
        if self._identity is None:
            digest = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
            for weights in sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin")):
                digest.update(file_sha256(weights).encode())
            self._identity = f"diffusers {digest.hexdigest()[:16]}"
        return self._identity

    def describe(self) -> str:
        return (f"diffusers AutoencoderKL {self.path} ({self.pixel_channels}→{self.latent_channels} channels, "
                f"/{self.factor}, scale {self.scale:g}, shift {self.shift:g})")
