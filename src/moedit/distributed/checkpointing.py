"""Activation checkpointing: keep less in forward, run it again in backward (parallel.activation_checkpointing).

- `full`    : each DiT block keeps only its input; backward replays the whole block.
- `moe_only`: each MoE feed-forward keeps only its input; attention keeps its activations. The MoE
              layer's gathered rows and expert hidden states (k·T rows of width H per layer) are most of a
              block's memory, and a replay of them costs the expert matmuls only.

torch.utils.checkpoint (non-reentrant) replays with the RNG state of the first forward, so dropout-like
noise is the same; the replay runs under `moe.replay.replay()`, so routers change no state twice (EMA
thresholds, bias counts, `last_routing`) and the gradients are those of the plain model.

Applied by replacing the module's forward on the instance: module names, state dicts and FSDP2's hooks
(which run around `forward` in `__call__`) stay as they are.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from moedit.moe.replay import replay

MODES = ("none", "full", "moe_only")


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        calls = [0]

        def once(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return forward(*a, **k)
            with replay():  # the second call is backward's replay
                return forward(*a, **k)

        return checkpoint(once, *args, use_reentrant=False, **kwargs)

    run.moedit_checkpointed = True
    return run


def _wrap(module: nn.Module) -> None:
    if not getattr(module.forward, "moedit_checkpointed", False):
        module.forward = _checkpointed(module.forward)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r} is unknown; choose one of: {', '.join(MODES)}")
    if mode == "none":
        return
    for block in model.blocks:
        if mode == "full":
            _wrap(block)
        elif block.moe is not None:
            _wrap(block.moe)
