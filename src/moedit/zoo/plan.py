"""The zoo's plan: which runs, with which settings, and the equal-activated-parameters check.

A zoo file (configs/zoo/routers.yaml) names entries, each a run config plus dotted overrides. The
plan crosses entries × datasets × seeds under one ZooSettings (step budget, evaluation N and
sampler, checkpoints for the quality curve) and gives every run its config:

    entry config + entry overrides + data.name, seed, train.steps/out_dir/ckpt_every/keep_last, sample.*

Runs live in ROOT/<dataset>/<entry>/seed<s>/ (normal run directories). ROOT/zoo.json keeps the
settings the zoo started with: resuming with other settings is refused, so one table never mixes
budgets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from moedit.config import Config, ConfigError, load_config
from moedit.eval import features as fx
from moedit.models.params import ParamCount, count_parameters
from moedit.utils.files import atomic_write_text

PLAN_FILE = "zoo.json"
DATASETS = fx.DATASETS  # the datasets with a feature classifier (eval/features.py)


class ZooError(RuntimeError):
    """A zoo cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config: Path
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ZooSettings:
    """Everything that makes two zoo runs comparable; stored in ROOT/zoo.json. Datasets, seeds and
    entries are not in it: a zoo may grow by another dataset or seed in a later call."""

    steps: int = 600
    curve_points: int = 3  # checkpoints evaluated, evenly spaced; the last is the final model
    eval_n: int = 300
    eval_seed: int = 0  # the same sampling noise for every run: differences come from the models
    sampler_steps: int = 20
    cfg_scale: float = 2.0
    threads: int | None = None  # train.threads for every run (None: torch default)

    def __post_init__(self) -> None:
        if self.curve_points < 1 or self.steps < self.curve_points or self.steps % self.curve_points:
            raise ZooError(f"steps ({self.steps}) must be a positive multiple of curve_points ({self.curve_points}): "
                           "the curve's checkpoints are saved every steps/curve_points steps")
        if self.eval_n < 10 or self.eval_n % 10 or self.sampler_steps < 1 or self.eval_seed < 0:
            raise ZooError(f"eval_n must be a positive multiple of the 10 classes (got {self.eval_n}), "
                           f"sampler_steps at least 1 (got {self.sampler_steps}), eval_seed at least 0")

    @property
    def curve_steps(self) -> list[int]:
        return [self.steps // self.curve_points * (i + 1) for i in range(self.curve_points)]


@dataclass(frozen=True)
class ZooRun:
    entry: ZooEntry
    dataset: str
    seed: int
    run_dir: Path


def load_zoo_file(path: str | Path) -> tuple[list[ZooEntry], float]:
    """The entries of a zoo file (config paths resolved against its folder) and its max_param_gap. A
    top-level `set:` applies to every entry, before the entry's own `set:` (which may override it)."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"zoo file {path} does not exist; the shipped one is configs/zoo/routers.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"entries", "max_param_gap", "claims", "set"}
    if unknown or not isinstance(data.get("entries"), dict) or not data["entries"]:
        raise ZooError(f"{path} must hold `entries:` (name: {{config: FILE, set: [KEY=VALUE ...]}}) and "
                       f"optionally `max_param_gap:`, `set:` and `claims:`; found keys {sorted(data)}")
    common = data.get("set") or []
    if not isinstance(common, list):
        raise ZooError(f"{path}: the top-level `set:` must be a list of KEY=VALUE overrides, got {common!r}")
    entries = []
    for name, spec in data["entries"].items():
        spec = {"config": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or "config" not in spec or set(spec) - {"config", "set"}:
            raise ZooError(f"{path}: entry {name!r} must be {{config: FILE, set: [KEY=VALUE ...]}}, got {spec!r}")
        config = (path.parent / spec["config"]).resolve()
        if not config.is_file():
            raise ZooError(f"{path}: entry {name!r} names {spec['config']}, which is not a file next to the zoo file")
        entries.append(ZooEntry(str(name), config, tuple(str(s) for s in [*common, *(spec.get("set") or ())])))
    return entries, float(data.get("max_param_gap", 0.02))


@dataclass(frozen=True)
class Claim:
    """A paper's ordering: `better` scored a lower FID than `worse` there."""

    better: str
    worse: str
    source: str


def load_claims(path: str | Path) -> list[Claim]:
    """The zoo file's `claims:` list, each naming two of its entries."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    names = set((data.get("entries") or {}))
    claims = []
    for item in data.get("claims") or []:
        if not isinstance(item, dict) or set(item) != {"better", "worse", "source"}:
            raise ZooError(f"{path}: a claim must be {{better: ENTRY, worse: ENTRY, source: TEXT}}, got {item!r}")
        unknown = [item[k] for k in ("better", "worse") if item[k] not in names]
        if unknown:
            raise ZooError(f"{path}: claim {item!r} names {', '.join(unknown)}, not an entry of the zoo file")
        claims.append(Claim(str(item["better"]), str(item["worse"]), str(item["source"])))
    return claims


def select_entries(entries: list[ZooEntry], names: list[str] | None) -> list[ZooEntry]:
    if not names:
        return entries
    by_name = {e.name: e for e in entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ZooError(f"no zoo entries named {', '.join(missing)}; the zoo file has: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def run_config(run: ZooRun, settings: ZooSettings) -> Config:
    """The entry's config with the zoo's shared settings on top."""
    every = settings.curve_steps[0] if settings.curve_points > 1 else 0
    shared = [f"data.name={run.dataset}", f"seed={run.seed}", f"train.steps={settings.steps}",
              f"train.out_dir={run.run_dir}", f"train.ckpt_every={every}",
              f"train.keep_last={settings.curve_points}", f"sample.steps={settings.sampler_steps}",
              f"sample.cfg_scale={settings.cfg_scale}"]
    if settings.threads:
        shared.append(f"train.threads={settings.threads}")
    try:
        return load_config(run.entry.config, [*run.entry.overrides, *shared])
    except ConfigError as exc:
        raise ZooError(f"zoo entry {run.entry.name!r}: {exc}") from exc


def plan_runs(entries: list[ZooEntry], datasets: list[str], seeds: list[int], root: Path) -> list[ZooRun]:
    """Every run, dataset-major then seed then entry: a stopped zoo has whole seeds done, not half of each."""
    bad = [d for d in datasets if d not in DATASETS]
    if bad or not datasets or not seeds or min(seeds) < 0:
        raise ZooError(f"datasets must be among {', '.join(DATASETS)} (got {', '.join(datasets) or 'none'}) and "
                       f"seeds non-negative integers (got {seeds or 'none'})")
    return [ZooRun(e, d, s, root / d / e.name / f"seed{s}") for d in datasets for s in seeds for e in entries]


def activated_table(entries: list[ZooEntry], max_gap: float) -> tuple[dict[str, ParamCount], str]:
    """Parameter counts per entry and the printed check; raises when activated parameters (routers left
    out) differ from the first entry's by more than max_gap."""
    counts = {e.name: count_parameters(load_config(e.config, list(e.overrides)).model) for e in entries}
    ref = next(iter(counts.values())).activated_without_router
    lines = [f"{'entry':24s} {'total':>11s} {'activated':>11s} {'routers':>9s} {'act. w/o routers':>17s} {'gap':>7s}"]
    too_far = []
    for name, c in counts.items():
        gap = c.activated_without_router / ref - 1
        lines.append(f"{name:24s} {c.total:>11,} {c.activated:>11,} {c.router:>9,} "
                     f"{c.activated_without_router:>17,} {gap:>+7.2%}")
        if abs(gap) > max_gap:
            too_far.append(f"{name} ({gap:+.2%})")
    table = "\n".join(lines)
    if too_far:
        raise ZooError(f"activated parameters differ by more than {max_gap:.0%} from {next(iter(counts))}: "
                       f"{', '.join(too_far)}. Resize their experts (model.moe.expert_ratio / shared_ratio, "
                       f"model.mlp_ratio) in the zoo file, or raise max_param_gap.\n{table}")
    return counts, table


def check_or_write_plan(root: Path, settings: ZooSettings) -> None:
    """First call writes ROOT/zoo.json; later calls must bring the same settings (a resumed zoo)."""
    path = root / PLAN_FILE
    mine = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as they read back
    if path.exists():
        theirs = json.loads(path.read_text())
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ZooError(f"{root} holds a zoo with other settings ({listed}). Continue it with its own "
                           f"settings, or choose another --out. Nothing was changed.")
        return
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(mine, indent=1) + "\n")
