"""Codecs: what stands between images and the model (docs/LATENT.md). `build_codec(cfg.codec)` is the one
entry point; a codec encodes a batch of images in [-1, 1] into the model's input space and decodes the
model's samples back. `identity` is pixel space; `autoencoder` moedit's own KL autoencoder (a trained run's
folder, or a shipped one: `moedit:mnist`, `moedit:fashion_mnist`); `diffusers` an AutoencoderKL from a local
directory."""

from __future__ import annotations

from moedit.codecs.base import Codec, CodecError, IdentityCodec
from moedit.config import CodecConfig

CODECS = ("identity", "autoencoder", "diffusers")


def build_codec(cfg: CodecConfig) -> Codec:
    if cfg.name == "identity":
        return IdentityCodec()
    if cfg.name == "autoencoder":
        from moedit.codecs.autoencoder import AutoencoderCodec

        return AutoencoderCodec(cfg)
    if cfg.name == "diffusers":
        from moedit.codecs.diffusers_vae import DiffusersCodec  # late: diffusers is an optional extra

        return DiffusersCodec(cfg)
    raise CodecError(f"codec.name={cfg.name!r} is not a codec; choose one of: {', '.join(CODECS)}")


__all__ = ["CODECS", "Codec", "CodecError", "IdentityCodec", "build_codec"]
