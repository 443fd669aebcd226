"""Parameter counts: total, and activated per token (the MoE papers' "activated parameters").

    activated = total − Σ_{MoE layers} (E_l − k̄) · P_expert,l

- E_l: routed experts layer l holds: model.moe.num_experts plus those the router adds (ProMoE's
  unconditional expert);
- k̄: routed experts one token runs through on average: top_k for token choice (`topk`, `promoe`)
  and for `race` (K = N·k assignments shared by N tokens); `capacity` (default top_k) for
  `expert_choice` and `diffmoe` (each expert takes C = capacity·pool/E tokens);
- P_expert,l: the parameters of one routed expert of layer l.

Everything else counts as activated: attention, adaLN, embeddings, dense FFNs, shared experts and
the routers (gates, prototypes, DiffMoE's capacity predictor, Race-DiT's per-layer target head),
since every token goes through them. ProMoE's unconditional expert serves only tokens of null-label
samples, and those skip the routed experts, so a token of either kind runs exactly one expert
besides the shared one: the unconditional expert is counted with the inactive ones.
`router` is reported on its own because papers differ there: DiffMoE's figures leave the gate and
capacity predictor out (docs/PRESETS.md).

The model is built on the meta device: tensors have shapes but no storage, so counting even the
16B-parameter DiT-MoE-G preset allocates nothing.

    python -m moedit.models.params            # the table of every MoE preset, as in docs/PRESETS.md
    python -m moedit.models.params DSMoE-S-E16
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moedit.config import ModelConfig, RouterConfig, from_dict
from moedit.models import DiT, build_model
from moedit.models.presets import MODEL_PRESETS
from moedit.moe.routers import router_class


@dataclass(frozen=True)
class ParamCount:
    total: int
    activated: int
    router: int  # gate / prototype / predictor / target-head parameters of all MoE layers (activated)

    @property
    def activated_without_router(self) -> int:
        return self.activated - self.router


def routed_experts_per_token(router: RouterConfig) -> float:
    """k̄ of the module docstring: the average number of routed experts a token runs through, as the
    router states it (`Router.experts_per_token`)."""
    return router_class(router.name).experts_per_token(router)


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def count_model(model: DiT) -> ParamCount:
    """Total, activated and router parameter counts of a built model (any device, meta included)."""
    total = _numel(model.parameters())
    inactive = router = 0
    for layer in model.moe_layers():
        experts = layer.experts
        per_expert = _numel(experts.parameters()) // experts.num_experts
        idle = experts.num_experts - routed_experts_per_token(layer.cfg.router)
        inactive += round(idle * per_expert)
        router += _numel(layer.router.parameters())
    return ParamCount(total=total, activated=total - inactive, router=router)


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Count a model configuration without allocating it (built on the meta device)."""
    with torch.device("meta"):
        return count_model(build_model(cfg))


def preset_config(name: str) -> ModelConfig:
    """The validated ModelConfig of a preset, exactly as `model.preset: <name>` gives it."""
    return from_dict({"model": {"preset": name}}).model


def moe_preset_names() -> list[str]:
    return [name for name, preset in MODEL_PRESETS.items() if preset.get("moe")]


def markdown_table(names: Iterable[str]) -> str:
    """One row per preset, counts in millions (10⁶) as docs/PRESETS.md lists them."""
    rows = ["| preset | total (M) | activated (M) | routers (M) | activated w/o routers (M) |",
            "|---|---:|---:|---:|---:|"]
    for name in names:
        c = count_parameters(preset_config(name))
        rows.append(f"| {name} | {c.total / 1e6:,.1f} | {c.activated / 1e6:,.1f} | {c.router / 1e6:,.2f} "
                    f"| {c.activated_without_router / 1e6:,.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(sys.argv[1:] or moe_preset_names()))
