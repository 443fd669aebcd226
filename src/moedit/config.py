"""Typed run configuration: nested kw_only dataclasses, YAML in and out, dotted overrides.

A run is described by one `Config`. It is built from plain dicts (YAML) by `from_dict`, which
rejects unknown keys and wrong types with a message naming the key and the valid choices, so a
typo never silently falls back to a default. `to_dict` gives the resolved config that every run
directory stores next to its outputs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-fixable problem in a configuration (bad key, wrong type, impossible value)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 3e-4 and 1e400 as numbers: YAML 1.1 (PyYAML) wants a dot and a signed
    exponent (3.0e-4), so `lr: 3e-4` in a file was a string and got refused as "expected a number"."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The YAML error in one line (PyYAML's own message spans several, with a caret drawing)."""
    mark = getattr(exc, "problem_mark", None)
    if getattr(exc, "problem", None) and mark is not None:
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------- model / MoE


@dataclass(kw_only=True)
class RouterConfig:
    """Every router's settings (docs/ROUTING_MATH.md §2-5). A field a router does not use is ignored by it.

    `gate`, `score` and `threshold_decay` left null take the chosen router's own default (its class's
    DEFAULTS: e.g. race uses an MLP gate with identity scores), filled in when the config is built so
    that the run directory's config.yaml shows the values actually used.
    """

    name: str = "topk"  # registry name: topk | expert_choice | diffmoe | race | promoe
    gate: str | None = None  # linear | mlp | cross_attn; null = the router's default
    gate_hidden: int | None = None  # mlp gate width; None = model width
    gate_heads: int = 1  # cross_attn gate heads
    score: str | None = None  # softmax | sigmoid | identity; null = the router's default
    top_k: int = 2  # experts per token (topk, promoe); average experts per token (race)
    normalize: bool = False  # renormalise the kept k weights to sum to 1 (only when top_k > 1, as the peers)
    normalize_top1: bool = False  # topk: renormalise a single kept weight too (exact top-1 conversion; see topk.py)
    scale: float = 1.0  # DeepSeek routed_scaling_factor
    selection_bias: bool = False  # auxiliary-loss-free balancing bias (selection only)
    bias_update_rate: float = 1e-3  # gamma in b += gamma * sign(mean_load - load_e)
    num_groups: int = 1  # topk: group-limited routing (DeepSeek n_group); 1 = off
    top_groups: int = 1  # topk: groups kept per token (DeepSeek topk_group)
    capacity: float | None = None  # expert_choice / diffmoe: C = floor(capacity * pool / E); null = top_k
    threshold_decay: float | None = None  # EMA decay of the inference threshold (race 0.99, diffmoe 0.95)
    ema_threshold: bool = True  # race: eval routes by the EMA threshold (batch independent); false = batch top-K
    target_head: bool = True  # race: per-layer regularisation head predicting the training target
    predictor_hidden: int | None = None  # diffmoe capacity predictor width; None = model width
    # diffmoe at inference: threshold (a token takes expert e when σ(P(x))_e > θ_e; batch-independent) |
    # topk (DiffMoE's code: e takes the k_e best-scored tokens of the call, k_e = tokens above θ_e; diffmoe.py)
    capacity_inference: str = "threshold"
    prototype_std: float = 0.02  # promoe: prototypes ~ N(0, std^2)
    contrastive_tau: float = 0.07  # promoe: routing contrastive loss temperature

    def __post_init__(self) -> None:
        from moedit.moe.routers import router_defaults  # late: the routers import this module

        for key, value in router_defaults(self.name).items():
            if getattr(self, key) is None:
                setattr(self, key, value)


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8
    expert_ratio: float = 2.0  # routed expert hidden width = expert_ratio * model width
    num_shared: int = 0
    shared_ratio: float | None = None  # shared expert hidden width ratio; None = expert_ratio
    placement: str = "all"  # all | interleaved (odd blocks MoE, even blocks dense)
    backend: str = "auto"  # auto | loop | grouped | fused (grouped with Triton glue kernels; CUDA)
    expert_layout: str = "row"  # row | col: experts' matrices row- or column-major in memory (moe/experts.py)
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass(kw_only=True)
class ModelConfig:
    preset: str | None = None  # e.g. "DiT-S/2" or "tiny"; explicit keys override the preset
    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    # video (docs/VIDEO.md): frames per clip, input B×C×T×H×W; 1 = an image model (B×C×H×W), the same code
    frames: int = 1
    temporal_patch: int = 1  # video: frames per token (pt; the 3-D patch is pt×p×p); must divide frames
    # video: full (one attention over every frame's tokens) | factorised (spatial, then temporal, in each block)
    attention: str = "full"
    rope_time_fraction: float = 0.25  # video with pos_embed rope: share of each head's channels rotated by frame
    width: int = 128
    depth: int = 4
    heads: int = 4
    num_classes: int = 10
    class_dropout: float = 0.1  # label -> null class with this probability in training (CFG)
    pos_embed: str = "sincos"  # sincos (rows first) | sincos_wh (columns first: facebookresearch/DiT) | rope
    rope_pairing: str = "adjacent"  # rope: adjacent (x_2j, x_2j+1) | rotate_half (x_j, x_j+d/4; DSMoE) (models/embed.py)
    # prediction channels; None = in_channels. More (DiT's learned sigma: 2·in_channels) are kept in the
    # output, and objectives and samplers use the first in_channels (docs/CONVERT.md)
    out_channels: int | None = None
    qk_norm: bool = False
    # the timestep embedder reads t_scale·t (t ∈ [0, 1]): 1000 is DiT's integer-step scale; 1 is DiT-MoE's
    # rectified-flow code, which feeds t itself (moedit import, docs/CONVERT.md)
    t_scale: float = 1000.0
    # the embedder reads t_scale·(1 − t) instead: a checkpoint whose time runs from noise (0) to data (1), as
    # DSMoE's rectified flow (moedit's t: 0 data, 1 noise, everywhere else)
    t_flip: bool = False
    ffn: str = "mlp"  # mlp (GELU-tanh, DiT) | swiglu; used by dense FFNs and experts alike
    dense_ffn: str | None = None  # the dense blocks' FFN when it differs: null = ffn | mlp | swiglu | mlp_silu (DSMoE)
    mlp_ratio: float = 4.0  # dense FFN hidden width = mlp_ratio * width
    moe: MoEConfig | None = None  # None = dense model


# ----------------------------------------------------------------------------- diffusion


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = "rectified_flow"  # rectified_flow | ddpm
    t_sampling: str = "logit_normal"  # uniform | logit_normal (rectified flow)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    t_shift: float = 1.0  # SD3-style time shift; 1 = none
    ddpm_steps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(kw_only=True)
class SampleConfig:
    sampler: str = "euler"  # euler | heun (flow); ddpm | ddim (ddpm)
    steps: int = 50
    cfg_scale: float = 1.0  # 1 = no guidance
    cfg_interval: list[float] | None = None  # [t_lo, t_hi]: guide only for t in this interval
    # guide only the first N predicted channels, the others keep the conditional prediction; null = all.
    # facebookresearch/DiT's sampling guides 3 of its 4 latent channels: 3 reproduces it (docs/CONVERT.md)
    cfg_channels: int | None = None
    per_class: int = 8  # grid columns: samples per class row
    use_ema: bool = True
    seed: int = 0


# ----------------------------------------------------------------------------- data / training


@dataclass(kw_only=True)
class DataConfig:
    # mnist | fashion_mnist | folder | npz | synthetic | latents (a `moedit extract` store) | moving_mnist |
    # video_folder (the video datasets, docs/VIDEO.md)
    name: str = "mnist"
    path: str | None = None  # folder / npz / latent store location; optional override for the others
    split: str = "train"
    image_size: int | None = None  # resize (folder data); None = native size; moving_mnist: the canvas (default 64)
    crop: str = "center"  # folder data, lazy or extracted: center | adm (ADM's, as DiT's ImageNet pipeline)
    lazy: bool = False  # folder data: decode each image when a batch needs it, never all into memory
    workers: int = 0  # DataLoader processes reading lazy folders and latents ahead of the step (0 = in the step)
    # data.name=latents: auto (from the folder) | moedit (`moedit extract`) | fast_dit | promoe | mar (the peers')
    latent_format: str = "auto"
    frames: int | None = None  # video clips: frames per clip (moving_mnist default 10; video_folder: checked)
    digits: int = 1  # moving_mnist: digits per clip, 1 (label: the digit) or 2 (label: the unordered pair)
    clips: int | None = None  # moving_mnist: clips in the split; None = 10000 train / 2000 test
    speed: float = 2.0  # moving_mnist: the digits' speed in pixels per frame


@dataclass(kw_only=True)
class CodecConfig:
    """What the model sees: the images themselves (`identity`) or an autoencoder's latents (docs/LATENT.md).
    The trainer writes the resolved scale and shift into the run's config.yaml, so the run alone samples."""

    # identity | autoencoder (moedit's own: `moedit autoencoder train`) | diffusers (a local AutoencoderKL, e.g. SD-VAE)
    name: str = "identity"
    # autoencoder: a finished `moedit autoencoder train` folder, or moedit:mnist / moedit:fashion_mnist (shipped);
    # diffusers: the directory (config.json + weights); nothing is ever downloaded
    path: str | None = None
    scale: float | None = None  # z = scale · (latent − shift); null = the codec's own (SD-VAE: 0.18215)
    shift: float | None = None  # null = the codec's own (0 for SD-VAE)
    posterior: str = "sample"  # training latents: sample (mean + σ·ε, as DiT) | mean


def default_aux_weights() -> dict[str, float]:
    """The default weight of every auxiliary loss a registered router emits (each router states its own:
    `AUX_LOSSES` in its file; the papers' weights, or a marked choice where a paper gives none)."""
    from moedit.moe.routers import default_aux_weights as from_registry  # late: the routers import this module

    return from_registry()



@dataclass(kw_only=True)
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    lr_schedule: str = "constant"  # constant (DiT) | cosine (decays to min_lr_ratio·lr at the last step)
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # parameter storage and the bf16 trap (docs/PRECISION.md): fp32 = float32 master weights (bf16
    # compute via autocast) | bf16 = pure bf16 storage, needs precision bf16
    param_dtype: str = "fp32"
    router_fp32: bool = True  # param_dtype=bf16: router and prototype parameters stay float32
    stochastic_rounding: bool = False  # param_dtype=bf16: round updates into bf16 stochastically
    bf16_monitor_every: int = 0  # measure lost updates (bf16_lost/<group>) every N steps; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU intra-op threads; None = torch default
    log_every: int = 25
    sample_every: int = 0  # 0 = only at the end
    ckpt_every: int = 500  # 0 = only at the end
    keep_last: int = 3
    tensorboard: bool = False
    # weight of every auxiliary loss the routers emit, summed in one place by the trainer; names
    # not given keep default_aux_weights() (filled in, so the run's config.yaml lists every weight)
    aux_weights: dict[str, float] = field(default_factory=dict)
    # how each auxiliary loss is combined over the MoE layers before it is weighted (docs/ROUTING_MATH.md §5):
    # peers = as the papers do (summed; Race's plr averaged, as its paper defines it), so a published
    # weight means what its paper says | mean = every loss averaged over the layers (moedit before
    # this convention; set it only to continue a run trained that way)
    aux_over_layers: str = "peers"

    def __post_init__(self) -> None:
        self.aux_weights = {**default_aux_weights(), **self.aux_weights}


@dataclass(kw_only=True)
class DiagnosticsConfig:
    """Routing monitor and failure detectors during training (docs/DIAGNOSTICS.md, docs/ROUTING_MATH.md §7).
    MoE models only; a dense model records nothing. Defaults fit the quickstart (1,500 steps)."""

    monitor: bool = True  # record routing to RUN/routing/ (measured ≈ 1.6% of a quickstart step, docs/DIAGNOSTICS.md)
    every: int = 1  # optimizer steps summed into one record; raise it for long runs to shrink the file
    t_buckets: int = 4  # equal-width buckets of t ∈ [0, 1] for the per-timestep tables
    max_classes: int = 32  # labels 0..max_classes-1 get their own row; higher ones share "other"; null has its own
    token_samples: int = 4  # tokens per record whose raw decisions (experts, weights) are kept; 0 = none
    probe_every: int = 50  # steps between expert-homogenisation probes (all experts on probe_tokens); 0 = never
    probe_tokens: int = 64  # tokens per layer the probe runs every expert on
    saturation_entropy: float = 0.95  # soft saturation: normalised score entropy at least this ...
    saturation_cosine: float = 0.99  # ... and mean pairwise cosine of expert outputs at least this (paper: 0.99)
    saturation_streak: int = 2  # ... on this many consecutive probes
    deadlock_share: float = 0.9  # selective deadlock: top-1 share at least this (paper: 0.9) ...
    deadlock_streak: int = 100  # ... for this many consecutive steps
    deadlock_release: float = 0.8  # a detected deadlock ends only when the top-1 share falls below this


@dataclass(kw_only=True)
class ParallelConfig:
    """How training spreads over the processes `torchrun` starts (docs/SCALING.md). One process: ignored
    except for activation checkpointing."""

    data: str = "ddp"  # ddp = every rank holds the whole model | fsdp = FSDP2 fully_shard per block and at the root
    ep: int = 1  # expert-parallel degree: each MoE layer's routed experts split over this many ranks (needs fsdp)
    activation_checkpointing: str = "none"  # none | full (every block) | moe_only (the MoE feed-forward only)
    timeout_s: float = 600.0  # a collective waiting longer than this ends the run (a rank died or hangs)


@dataclass(kw_only=True)
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ----------------------------------------------------------------------------- dict <-> dataclass


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), where)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")  # a bug in moedit, not the user


def _finite(value: float, where: str) -> float:
    """Every float setting is a real number: NaN passes every `<` check and inf (also what an overflowing
    literal such as 1e400 becomes) breaks the arithmetic, so both are refused here, once for all fields."""
    if not math.isfinite(value):
        raise ConfigError(f"{where}={value} is not a finite number; give an ordinary number "
                          "(.nan, .inf and literals beyond ±1.8e308 are not settings)")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}; "
            f"valid keys here: {', '.join(names)}"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def dataclass_from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Any config dataclass (e.g. `moedit autoencoder train`'s) from a plain dict, with Config's type
    checks and unknown-key errors; range checks are the caller's."""
    return _build(cls, dict(data or {}), where)


def from_dict(data: dict) -> Config:
    """Build a validated Config from a plain dict (missing keys take their defaults)."""
    from moedit.models.presets import resolve_model_preset

    data = dict(data or {})
    if isinstance(data.get("model"), dict):
        data["model"] = resolve_model_preset(data["model"])
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file. A top-level `base: other.yaml` (relative to this file) is loaded first
    and this file's keys are merged over it, level by level, so a variant states only what differs."""
    path = Path(path)
    data = _yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"config file {path}: `base: {base}` makes a cycle of base files")
    return deep_merge(load_yaml(base_path, _seen + (path.resolve(),)), data)


def _yaml_file(path: Path) -> Any:
    """The parsed file; a missing file, a folder, a binary or non-UTF-8 file, or bad YAML is a ConfigError."""
    from moedit.utils.files import describe_os_error

    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file such as configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/quickstart.yaml")
    try:
        return _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not a UTF-8 text file (byte {exc.start} cannot be decoded): "
                          "is it a binary file? pass a YAML file such as configs/quickstart.yaml") from exc
    except OSError as exc:
        raise ConfigError(f"config file: {describe_os_error(exc, 'read')}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc


def deep_merge(base: dict, over: dict) -> dict:
    """`over` merged onto `base`: nested mappings merge key by key, any other value (null too) replaces."""
    merged = _deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _deepcopy(value)
    return merged


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Written atomically: a kill while a resumed run rewrites its config.yaml must not empty it."""
    from moedit.utils.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, creating levels."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value, e.g. train.lr=3e-4")
        key, raw = item.split("=", 1)
        parts = _override_key(item, key)
        value = _override_value(item, raw)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _override_key(item: str, key: str) -> list[str]:
    parts = key.strip().split(".")
    if not all(part.strip() for part in parts):
        raise ConfigError(f"override {item!r}: the key {key.strip()!r} has an empty part; "
                          "write a dotted path of config keys, e.g. train.lr=3e-4")
    return parts


def _override_value(item: str, raw: str) -> Any:
    """The value parsed as YAML (empty = null); strings like 1e-3 or nan that YAML keeps as text become floats."""
    if raw == "":
        return None
    try:
        value = _yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); "
                          "values are read as YAML: e.g. 3e-4, true, [0.9, 0.95], or quote a string") from exc
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    return value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


# ----------------------------------------------------------------------------- semantic checks


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _need(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise `key=value <rule>` unless ok; rule says the valid range and, where it helps, what the value means."""
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


def _at_least(obj: Any, section: str, keys: tuple[str, ...], low: int, note: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        _need(value >= low, f"{section}.{key}", value, f"must be at least {low}{note}")


def _positive(obj: Any, section: str, keys: tuple[str, ...], note: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        _need(value is None or value > 0, f"{section}.{key}", value, f"must be positive{note}")


def validate(cfg: Config) -> None:
    """Checks that need more than one field or a range; each names the key and the fix. (Non-finite
    floats never get here: `_convert` refuses them for every field.)"""
    _validate_model(cfg.model)
    _validate_objective(cfg.objective)
    _validate_sample(cfg.sample, cfg.objective, cfg.model.in_channels)
    _validate_train(cfg.train)
    from moedit.data import DATASETS  # late, like every registry below: they import this module

    _choice(cfg.data.name, DATASETS, "data.name")
    _positive(cfg.data, "data", ("image_size",), " (the resized side in pixels), or null for the native size")
    _choice(cfg.data.crop, ("center", "adm"), "data.crop")
    _need(cfg.data.workers >= 0, "data.workers", cfg.data.workers, "must be at least 0 (0 = read in the training step)")
    _need(not cfg.data.lazy or cfg.data.name == "folder", "data.lazy", cfg.data.lazy,
          "applies to data.name=folder only (the other datasets are small and read into memory; latents are lazy)")
    _choice(cfg.data.latent_format, ("auto", "moedit", "fast_dit", "promoe", "mar"), "data.latent_format")
    _positive(cfg.data, "data", ("frames", "clips"), ", or null for the default")
    _need(cfg.data.digits in (1, 2), "data.digits", cfg.data.digits,
          "must be 1 or 2 (moving_mnist labels a clip by its digit or its unordered pair of digits)")
    _need(cfg.data.speed >= 0, "data.speed", cfg.data.speed, "must be at least 0 (pixels per frame)")
    _need(cfg.data.name != "moving_mnist" or cfg.data.image_size is None or cfg.data.image_size >= 28,
          "data.image_size", cfg.data.image_size, "is the moving_mnist canvas: at least 28 (one digit), e.g. 64")
    if cfg.data.name == "latents" and not cfg.data.path:
        raise ConfigError("data.name=latents needs data.path: the folder `moedit extract --out` wrote")
    _validate_diagnostics(cfg.diagnostics)
    _validate_codec(cfg.codec)
    _validate_parallel(cfg)
    if cfg.model.frames > 1 and cfg.codec.name != "identity":
        raise ConfigError(f"codec.name={cfg.codec.name}: video models (model.frames > 1) train in pixel space "
                          "in this version; set codec.name=identity")


def _validate_parallel(cfg: Config) -> None:
    """What can be checked before the world size is known; the rest (ep divides the world size) is checked
    where the mesh is built (distributed/mesh.py)."""
    p = cfg.parallel
    _choice(p.data, ("ddp", "fsdp"), "parallel.data")
    _choice(p.activation_checkpointing, ("none", "full", "moe_only"), "parallel.activation_checkpointing")
    _at_least(p, "parallel", ("ep",), 1, " (1 = no expert parallelism)")
    _positive(p, "parallel", ("timeout_s",))
    if p.ep > 1 and p.data != "fsdp":
        raise ConfigError(f"parallel.ep={p.ep} splits the experts over ranks, which needs sharded data parallelism: "
                          "set parallel.data=fsdp (ddp replicates every parameter on every rank)")
    if p.ep > 1 and cfg.model.moe is None:
        raise ConfigError(f"parallel.ep={p.ep}: the model has no MoE layer to split; set parallel.ep=1")
    if p.activation_checkpointing == "moe_only" and cfg.model.moe is None:
        raise ConfigError("parallel.activation_checkpointing=moe_only: the model has no MoE layer; use full or none")
    if p.data == "fsdp" and cfg.train.param_dtype != "fp32":
        raise ConfigError("parallel.data=fsdp keeps float32 sharded weights and computes in bf16 through its "
                          "mixed-precision policy; train.param_dtype=bf16 storage is for ddp. Set "
                          "train.param_dtype=fp32 (or parallel.data=ddp)")
    if p.data == "fsdp" and cfg.train.bf16_monitor_every > 0:
        raise ConfigError("train.bf16_monitor_every compares whole weight tensors before and after each step, which "
                          "parallel.data=fsdp shards; measure it with parallel.data=ddp (or one process), or set "
                          "train.bf16_monitor_every=0")
    if p.data == "fsdp" and cfg.model.moe is not None and cfg.model.moe.expert_layout == "col":
        raise ConfigError("parallel.data=fsdp needs contiguous parameters, but model.moe.expert_layout=col stores "
                          "each expert's matrices column-major; set model.moe.expert_layout=row (checkpoints are "
                          "the same in either layout)")


def _validate_codec(c: CodecConfig) -> None:
    from moedit.codecs import CODECS

    _choice(c.name, CODECS, "codec.name")
    _choice(c.posterior, ("sample", "mean"), "codec.posterior")
    if c.name == "diffusers" and not c.path:
        raise ConfigError("codec.name=diffusers needs codec.path: a local AutoencoderKL directory (config.json and "
                          "diffusion_pytorch_model.safetensors, e.g. a copy of stabilityai/sd-vae-ft-ema)")
    if c.name == "autoencoder" and not c.path:
        raise ConfigError("codec.name=autoencoder needs codec.path: a shipped autoencoder (moedit:mnist, "
                          "moedit:fashion_mnist) or the folder of a finished `moedit autoencoder train` run")
    if c.name == "identity" and (c.path or c.scale is not None or c.shift is not None):
        raise ConfigError("codec.path/scale/shift are set but codec.name=identity (pixels) uses none of them; "
                          "set codec.name=autoencoder or diffusers, or remove them")
    _need(c.scale is None or c.scale > 0, "codec.scale", c.scale, "must be positive (SD-VAE: 0.18215), or null")


def _validate_video(m: ModelConfig) -> None:
    _at_least(m, "model", ("frames", "temporal_patch"), 1)
    if m.frames % m.temporal_patch != 0:
        raise ConfigError(f"model.frames={m.frames} is not divisible by model.temporal_patch={m.temporal_patch}; "
                          f"pick a temporal patch that divides it (e.g. {_divisors(m.frames)})")
    _choice(m.attention, ("full", "factorised"), "model.attention")
    if m.attention == "factorised" and m.frames // m.temporal_patch < 2:
        raise ConfigError("model.attention=factorised needs at least two temporal tokens (model.frames / "
                          "model.temporal_patch >= 2); an image model (frames 1) uses model.attention=full")
    if m.frames // m.temporal_patch > 1 and m.pos_embed == "rope":
        from moedit.models.embed import rope_axis_channels

        if not 0.0 < m.rope_time_fraction < 1.0:
            raise ConfigError(f"model.rope_time_fraction={m.rope_time_fraction} must lie in (0, 1), e.g. 0.25")
        try:
            rope_axis_channels(m.width // m.heads, m.rope_time_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _validate_model(m: ModelConfig) -> None:
    _at_least(m, "model", ("image_size", "in_channels", "patch_size", "width", "depth", "heads", "num_classes"), 1)
    # (at least 1 also keeps the divisibility checks below from dividing by zero)
    if m.image_size % m.patch_size != 0:
        raise ConfigError(
            f"model.image_size={m.image_size} is not divisible by model.patch_size={m.patch_size}; "
            f"pick a patch size that divides it (e.g. {_divisors(m.image_size)})"
        )
    if m.width % m.heads != 0:
        raise ConfigError(f"model.width={m.width} must be divisible by model.heads={m.heads}")
    _validate_video(m)
    if m.pos_embed == "rope" and (m.width // m.heads) % 4 != 0:
        raise ConfigError("model.pos_embed=rope needs a head width (width/heads) divisible by 4")
    if m.pos_embed != "rope" and m.width % 4 != 0:  # sincos_2d splits width into 4 equal parts
        raise ConfigError(f"model.pos_embed={m.pos_embed} needs model.width divisible by 4, got {m.width}")
    from moedit.models.embed import POS_EMBEDS, ROPE_PAIRINGS
    from moedit.models.ffn import FFNS
    from moedit.moe.experts import KINDS as EXPERT_KINDS

    _choice(m.pos_embed, POS_EMBEDS, "model.pos_embed")
    _choice(m.rope_pairing, ROPE_PAIRINGS, "model.rope_pairing")
    if m.out_channels is not None and m.out_channels < m.in_channels:
        raise ConfigError(f"model.out_channels={m.out_channels} must be at least model.in_channels="
                          f"{m.in_channels} (the prediction's first in_channels are used), or null")
    _choice(m.ffn, EXPERT_KINDS if m.moe is not None else tuple(FFNS), "model.ffn")
    if m.dense_ffn is not None:
        _choice(m.dense_ffn, tuple(FFNS), "model.dense_ffn")
    _positive(m, "model", ("mlp_ratio",), " (dense FFN hidden width = mlp_ratio · width), e.g. 4")
    _positive(m, "model", ("t_scale",), " (the timestep embedder reads t_scale·t; DiT: 1000)")
    if not 0.0 <= m.class_dropout < 1.0:
        raise ConfigError("model.class_dropout must be in [0, 1)")
    if m.moe is not None:
        _validate_moe(m.moe)


def _validate_objective(o: ObjectiveConfig) -> None:
    from moedit.objectives import OBJECTIVES
    from moedit.objectives.ddpm import BETA_SCHEDULES
    from moedit.objectives.timesteps import T_SAMPLERS

    _choice(o.name, tuple(OBJECTIVES), "objective.name")
    _choice(o.t_sampling, T_SAMPLERS, "objective.t_sampling")
    _choice(o.beta_schedule, BETA_SCHEDULES, "objective.beta_schedule")
    _positive(o, "objective", ("logit_std",), " (the spread of the logit-normal t), e.g. 1")
    _positive(o, "objective", ("t_shift",), " (1 = no shift)")
    _at_least(o, "objective", ("ddpm_steps",), 1)
    for key in ("beta_start", "beta_end"):
        _need(0.0 < getattr(o, key) < 1.0, f"objective.{key}", getattr(o, key),
              "must be in (0, 1): it is a noise variance per step (DDPM uses 1e-4 and 0.02)")
    _need(o.beta_start <= o.beta_end, "objective.beta_start", o.beta_start,
          f"must not exceed objective.beta_end={o.beta_end} (the linear schedule rises from start to end)")


def _validate_sample(s: SampleConfig, o: ObjectiveConfig, in_channels: int) -> None:
    """Checked with the training config, so a bad value fails before training, not after it."""
    from moedit.objectives import OBJECTIVES
    from moedit.samplers import SAMPLERS

    kind = OBJECTIVES[o.name].prediction_kind  # objective.name is checked before the sample section
    valid_samplers = tuple(name for name, (_, needs) in SAMPLERS.items() if needs == kind)
    if s.sampler not in valid_samplers:
        raise ConfigError(
            f"sample.sampler={s.sampler!r} does not fit objective.name={o.name!r}; "
            f"choose one of: {', '.join(valid_samplers)}"
        )
    _at_least(s, "sample", ("steps", "per_class"), 1)
    _need(s.cfg_channels is None or 1 <= s.cfg_channels <= in_channels, "sample.cfg_channels", s.cfg_channels,
          f"must be between 1 and model.in_channels={in_channels} (the channels guided), or null for all")
    if s.cfg_interval is None:
        return
    if len(s.cfg_interval) != 2:
        raise ConfigError("sample.cfg_interval must be [t_lo, t_hi] or null")
    lo, hi = s.cfg_interval
    _need(0.0 <= lo <= hi <= 1.0, "sample.cfg_interval", s.cfg_interval,
          "must be [t_lo, t_hi] with 0 <= t_lo <= t_hi <= 1 (times t in [0, 1]), or null to guide at every step")


DEVICE_FORMS = "auto | cpu | cuda | cuda:N (N = 0, 1, ...)"


def _validate_train(t: TrainConfig) -> None:
    _choice(t.precision, ("auto", "fp32", "bf16"), "train.precision")
    _validate_storage(t)
    _choice(t.lr_schedule, ("constant", "cosine"), "train.lr_schedule")
    _at_least(t, "train", ("steps", "batch_size", "grad_accum", "keep_last", "log_every"), 1)
    _at_least(t, "train", ("warmup_steps",), 0, " (0 = no warmup)")
    _at_least(t, "train", ("ckpt_every", "sample_every"), 0, " (0 = only at the end)")
    _need(t.threads is None or t.threads >= 1, "train.threads", t.threads,
          "must be at least 1, or null for torch's default")
    _need(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t.device) is not None, "train.device", t.device,
          f"is not a device; use one of: {DEVICE_FORMS}")
    _validate_optimizer(t)


def _validate_optimizer(t: TrainConfig) -> None:
    _positive(t, "train", ("lr",), ", e.g. 1e-3")
    if len(t.betas) != 2:
        raise ConfigError("train.betas must be a list of two numbers, e.g. [0.9, 0.999]")
    for i, beta in enumerate(t.betas):
        _need(0.0 <= beta < 1.0, f"train.betas[{i}]", beta,
              "must be in [0, 1) (Adam's moment decays), e.g. [0.9, 0.999]")
    _at_least(t, "train", ("weight_decay",), 0, " (0 = none)")
    _need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip,
          "must be positive (the largest gradient norm kept), or null for no clipping")
    _need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1), e.g. 0.999")
    _need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", t.min_lr_ratio,
          "must be in [0, 1]: the cosine schedule's final lr as a fraction of train.lr")
    _choice(t.aux_over_layers, ("peers", "mean"), "train.aux_over_layers")
    for name, weight in t.aux_weights.items():
        _need(weight >= 0, f"train.aux_weights.{name}", weight, "must be at least 0 (0 disables that loss)")


def _validate_diagnostics(d: DiagnosticsConfig) -> None:
    for key in ("every", "t_buckets", "probe_tokens", "saturation_streak", "deadlock_streak"):
        if getattr(d, key) < 1:
            raise ConfigError(f"diagnostics.{key}={getattr(d, key)} must be at least 1")
    for key in ("max_classes", "token_samples", "probe_every"):
        if getattr(d, key) < 0:
            raise ConfigError(f"diagnostics.{key}={getattr(d, key)} must be at least 0 (0 turns it off)")
    for key in ("saturation_entropy", "saturation_cosine", "deadlock_share", "deadlock_release"):
        if not 0.0 < getattr(d, key) <= 1.0:
            raise ConfigError(f"diagnostics.{key}={getattr(d, key)} must be in (0, 1]")
    if d.deadlock_release > d.deadlock_share:
        raise ConfigError(f"diagnostics.deadlock_release={d.deadlock_release} must not exceed "
                          f"diagnostics.deadlock_share={d.deadlock_share} (it is the lower, release threshold)")


def _validate_moe(moe: MoEConfig) -> None:
    from moedit.moe.dispatch import BACKENDS
    from moedit.moe.gates import GATES, SCORES
    from moedit.moe.routers import ROUTERS

    _choice(moe.placement, ("all", "interleaved"), "model.moe.placement")
    _choice(moe.backend, BACKENDS, "model.moe.backend")
    _choice(moe.expert_layout, ("row", "col"), "model.moe.expert_layout")
    _choice(moe.router.name, tuple(ROUTERS), "model.moe.router.name")
    r = moe.router
    if r.gate is not None:  # null only for routers without a gate network (promoe: prototypes)
        _choice(r.gate, tuple(GATES), "model.moe.router.gate")
    _choice(r.score, tuple(SCORES), "model.moe.router.score")
    _choice(r.capacity_inference, ("threshold", "topk"), "model.moe.router.capacity_inference")
    if moe.num_experts < 1:
        raise ConfigError("model.moe.num_experts must be at least 1")
    _positive(moe, "model.moe", ("expert_ratio",), " (expert hidden width = expert_ratio · model.width)")
    _positive(moe, "model.moe", ("shared_ratio",), " (shared expert hidden width ratio), or null for expert_ratio")
    _at_least(moe, "model.moe", ("num_shared",), 0, " (0 = no shared experts)")
    if not 1 <= r.top_k <= moe.num_experts:
        raise ConfigError(
            f"model.moe.router.top_k={r.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}"
        )
    if r.capacity is not None and not 0 < r.capacity <= moe.num_experts:
        raise ConfigError(f"model.moe.router.capacity={r.capacity} must be in (0, num_experts]: it is the "
                          "average number of experts per token")
    if r.threshold_decay is not None and not 0.0 <= r.threshold_decay < 1.0:
        raise ConfigError(f"model.moe.router.threshold_decay={r.threshold_decay} must be in [0, 1)")
    if r.contrastive_tau <= 0:
        raise ConfigError("model.moe.router.contrastive_tau must be positive")
    _validate_router_numbers(r)
    _validate_groups(moe)


def _validate_router_numbers(r: RouterConfig) -> None:
    _positive(r, "model.moe.router", ("scale",), " (it multiplies the routed experts' output; 1 = none)")
    _at_least(r, "model.moe.router", ("bias_update_rate", "prototype_std"), 0)
    _at_least(r, "model.moe.router", ("gate_heads",), 1)
    _positive(r, "model.moe.router", ("gate_hidden", "predictor_hidden"), " (a width), or null for model.width")


def _validate_groups(moe: MoEConfig) -> None:
    r = moe.router
    if r.num_groups < 1 or moe.num_experts % r.num_groups != 0:
        raise ConfigError(f"model.moe.router.num_groups={r.num_groups} must divide "
                          f"model.moe.num_experts={moe.num_experts}")
    if not 1 <= r.top_groups <= r.num_groups:
        raise ConfigError(f"model.moe.router.top_groups={r.top_groups} must be between 1 and num_groups={r.num_groups}")
    if r.num_groups > 1 and r.top_groups * (moe.num_experts // r.num_groups) < r.top_k:
        raise ConfigError(f"model.moe.router.top_groups={r.top_groups} groups of {moe.num_experts // r.num_groups} "
                          f"experts hold fewer than top_k={r.top_k} experts; raise top_groups")


def _validate_storage(t: TrainConfig) -> None:
    """Parameter storage vs compute precision (docs/PRECISION.md); precision=auto with bf16 storage is
    checked by the trainer, once the device is known."""
    _choice(t.param_dtype, ("fp32", "bf16"), "train.param_dtype")
    if t.bf16_monitor_every < 0:
        raise ConfigError(f"train.bf16_monitor_every={t.bf16_monitor_every} must be at least 0 (0 turns it off)")
    if t.param_dtype == "bf16" and t.precision == "fp32":
        raise ConfigError("train.param_dtype=bf16 stores the weights in bfloat16, which needs bf16 compute; "
                          "set train.precision=bf16, or train.param_dtype=fp32")
    if t.param_dtype == "fp32" and t.stochastic_rounding:
        raise ConfigError("train.stochastic_rounding=true rounds updates into bf16 weights, but train.param_dtype="
                          "fp32 stores float32 weights, which lose nothing; set train.param_dtype=bf16 or "
                          "train.stochastic_rounding=false")
    if t.param_dtype == "fp32" and not t.router_fp32:
        raise ConfigError("train.router_fp32=false asks for a bf16 router, but train.param_dtype=fp32 stores every "
                          "parameter in float32; set train.param_dtype=bf16 or train.router_fp32=true")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 16)
