"""Forwards that are replays: activation checkpointing runs a block's forward a second time in backward
to rebuild what it did not keep. A replay must compute the same values and change no state, so the
side effects routers have in training forwards are skipped while `replaying()` is true:

- the EMA thresholds' per-step observations (Race-DiT's τ̂, DiffMoE's θ_e; moe/threshold.py),
- the loads counted for the auxiliary-loss-free bias update (topk's step_load_E),
- `MoELayer.last_routing`, which the aux losses and the routing monitor read after backward.

Without this a checkpointed step would observe every threshold twice and double the bias counts.
The flag is set by whoever replays (distributed/checkpointing.py); this module only holds it.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def replaying() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def replay():
    """Within: a replayed forward (state-changing side effects are skipped)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
