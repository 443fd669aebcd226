"""`autoencoder`: moedit's own KL autoencoder (autoencoder_net.py) as a codec, and its files.

An exported autoencoder is two files, written by `moedit autoencoder train` at the end of a run:

    autoencoder.safetensors   the (EMA) weights, float32
    autoencoder.json          {"format": "moedit-autoencoder", "spec": {...}, "scale", "shift",
                               "weights_sha256", and the run's data, training and measured quality}

`codec.path` names either a folder holding them (a finished `moedit autoencoder train` run) or one of the
shipped autoencoders, `moedit:mnist` and `moedit:fashion_mnist` (package folder codecs/weights/, made by
scripts/train_autoencoder.py, their record says how). The latent scale and shift are measured by the
trainer on the training data — shift = mean and scale = 1/std of the posterior samples — so that the
diffusion model sees z = scale · (sample − shift) with zero mean and unit variance, as SD-VAE's 0.18215 was
chosen for it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moedit.codecs.autoencoder_net import AutoencoderSpec, KLAutoencoder
from moedit.codecs.base import Codec, CodecError
from moedit.config import CodecConfig
from moedit.utils.files import atomic_write, atomic_write_text, file_sha256

FORMAT = "moedit-autoencoder"
WEIGHTS_NAME, RECORD_NAME = "autoencoder.safetensors", "autoencoder.json"
SHIPPED_PREFIX = "moedit:"
SHIPPED = ("mnist", "fashion_mnist")


def shipped_dir() -> Path:
    return Path(__file__).parent / "weights"


def autoencoder_files(where: str | Path) -> tuple[Path, Path]:
    """(weights, record) for a folder or a `moedit:<name>` shipped autoencoder; a CodecError names the fix."""
    where = str(where)
    if where.startswith(SHIPPED_PREFIX):
        name = where[len(SHIPPED_PREFIX):]
        if name not in SHIPPED:
            raise CodecError(f"codec.path={where!r}: moedit ships no autoencoder {name!r}; the shipped ones are "
                             + ", ".join(SHIPPED_PREFIX + s for s in SHIPPED) + " (or give a folder that "
                             "`moedit autoencoder train` wrote)")
        base = shipped_dir() / f"autoencoder_{name}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")
    folder = Path(where).expanduser()
    if not folder.is_dir():
        raise CodecError(f"codec.path={where!r} is not a folder; give the out_dir of a finished `moedit autoencoder "
                         "train` run, or a shipped autoencoder: " + ", ".join(SHIPPED_PREFIX + s for s in SHIPPED))
    if not (folder / RECORD_NAME).is_file():
        raise CodecError(f"{folder} has no {RECORD_NAME}: a `moedit autoencoder train` run writes it (and "
                         f"{WEIGHTS_NAME}) when it finishes; let the run finish or resume it with --resume")
    return folder / WEIGHTS_NAME, folder / RECORD_NAME


def read_record(record_path: Path) -> dict:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"{record_path} cannot be read as an autoencoder record: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CodecError(f"{record_path} is not a moedit autoencoder record (no \"format\": \"{FORMAT}\")")
    for key, kind in (("spec", dict), ("scale", (int, float)), ("shift", (int, float)), ("weights_sha256", str)):
        if not isinstance(record.get(key), kind):
            raise CodecError(f"{record_path}: field {key!r} is missing or of the wrong type; the record is damaged")
    return record


def spec_from_record(record: dict, where: Path) -> AutoencoderSpec:
    names = {f.name for f in dataclasses.fields(AutoencoderSpec)}
    try:
        spec = AutoencoderSpec(**{k: v for k, v in record["spec"].items() if k in names})
    except TypeError as exc:
        raise CodecError(f"{where}: its spec {record['spec']} cannot build an autoencoder: {exc}") from exc
    if spec.problems():
        raise CodecError(f"{where}: its spec is invalid: " + "; ".join(spec.problems()))
    return spec


def load_autoencoder(where: str | Path) -> tuple[KLAutoencoder, dict]:
    """The network with its weights (eval mode, frozen) and its record; every damage is a CodecError."""
    weights_path, record_path = autoencoder_files(where)
    for path in (weights_path, record_path):
        if not path.is_file():
            raise CodecError(f"{path} is missing; reinstall moedit, or re-export the autoencoder")
    record = read_record(record_path)
    if file_sha256(weights_path) != record["weights_sha256"]:
        raise CodecError(f"{weights_path} does not match the sha256 in {record_path.name}: the weights are damaged "
                         "or were replaced; restore both files from the same run")
    model = KLAutoencoder(spec_from_record(record, record_path))
    try:
        model.load_state_dict(load_file(str(weights_path)), strict=True)
    except (SafetensorError, RuntimeError) as exc:
        raise CodecError(f"{weights_path} does not fit the network its record describes: {exc}") from exc
    return model.eval().requires_grad_(False), record


def export_autoencoder(folder: Path, model: KLAutoencoder, scale: float, shift: float, extra: dict) -> Path:
    """Write folder/autoencoder.safetensors then folder/autoencoder.json (the record, with the weights'
    sha256), each atomically: a reader finds either no record or one that matches its weights."""
    folder = Path(folder)
    weights_path = folder / WEIGHTS_NAME
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(weights_path, lambda tmp: save_file(tensors, tmp))
    record = {"format": FORMAT, "version": 1, "spec": dataclasses.asdict(model.spec), "factor": model.spec.factor,
              "scale": float(scale), "shift": float(shift), **extra,
              "weights_sha256": file_sha256(weights_path), "weights_bytes": weights_path.stat().st_size}
    atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=1))
    return folder / RECORD_NAME


def update_record(record_path: Path, **fields) -> dict:
    """Add fields (e.g. the measured reconstruction quality) to an exported record, atomically."""
    record = {**read_record(record_path), **fields}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


class AutoencoderCodec(Codec):
    name = "autoencoder"

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.where = cfg.path
        self.net, self.record = load_autoencoder(cfg.path)
        self.scale = float(cfg.scale if cfg.scale is not None else self.record["scale"])
        self.shift = float(cfg.shift if cfg.shift is not None else self.record["shift"])
        self.spec = self.net.spec

    def latent_shape(self, channels: int, size: int) -> tuple[int, int]:
        return self.spec.latent_channels, size // self.spec.factor

    def pixel_shape(self, channels: int, size: int) -> tuple[int, int]:
        return self.spec.in_channels, size * self.spec.factor

    def check_pixels(self, channels: int, size: int) -> None:
        trained_on = self.record.get("data", {}).get("name", "its training data")
        if channels != self.spec.in_channels:
            raise CodecError(f"the data has {channels}-channel images but the autoencoder {self.where} (trained on "
                             f"{trained_on}) takes {self.spec.in_channels}; use matching data or another codec")
        if size % self.spec.factor:
            raise CodecError(f"the data's side {size} is not a multiple of the autoencoder's downsampling factor "
                             f"{self.spec.factor}; set data.image_size to a multiple of {self.spec.factor}")

    @torch.no_grad()
    def moments(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled posterior (μ, log σ²): what a latent store keeps."""
        return self.net.moments(x_BCHW.float())

    @torch.no_grad()
    def encode(self, x_BCHW: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        mean_BCHW, logvar_BCHW = self.moments(x_BCHW)
        if sample:
            eps_BCHW = torch.randn(mean_BCHW.shape, generator=generator, device=mean_BCHW.device)
            mean_BCHW = mean_BCHW + torch.exp(0.5 * logvar_BCHW) * eps_BCHW
        return (mean_BCHW - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z_BCHW.float() / self.scale + self.shift).clamp(-1, 1)

    def identity(self) -> str:
        return f"autoencoder {self.record['weights_sha256'][:16]}"

    def describe(self) -> str:
        s = self.spec
        return (f"moedit autoencoder {self.where} ({s.in_channels}→{s.latent_channels} channels, /{s.factor}, "
                f"scale {self.scale:g}, shift {self.shift:g})")
