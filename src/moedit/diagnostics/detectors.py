"""Routing failure detectors over the routing record (docs/ROUTING_MATH.md §7, arXiv 2605.19378).

- **Selective deadlock** (MLP gates): a layer sends nearly all tokens to one expert and stays there.
  Per record, top-1 share = max_e #{i : argmax_e s_ie = e} / N (record.top1_share_RY). A layer is
  deadlocked once top-1 share ≥ `deadlock_share` (0.9) has held for `deadlock_streak` consecutive
  optimizer steps; the event names the first step of that streak. It ends at the first record whose
  top-1 share is below `deadlock_release` (0.8): a lower release threshold, so that a layer hovering
  just under 0.9 is not reported as freed (and a dip during the streak still restarts it).
- **Global soft saturation** (linear gates): the scores are near uniform *and* the experts have
  become interchangeable. Per probe, a layer is saturated when its normalised score entropy ≥
  `saturation_entropy` and its experts' mean pairwise output cosine ≥ `saturation_cosine` (0.99);
  the event fires after `saturation_streak` consecutive saturated probes. "Global" saturation is the
  moment every MoE layer is saturated at once.
- **Depth profile**: deadlocked layers by third of the network (block index b of depth d goes to
  shallow, middle or deep by ⌊3b/d⌋). The paper finds them at the two ends (a U shape).

Detectors run on the host over the records rank 0 reads back (never a device sync of their own).
Events are dicts with `step` (the record step at which they were detected), `kind` and details.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moedit.config import DiagnosticsConfig
from moedit.diagnostics.record import entropy_RY, probe_cos_RY, top1_share_RY

THIRDS = ("shallow", "middle", "deep")


def depth_third(block: int, depth: int) -> str:
    return THIRDS[min(2, 3 * block // depth)]


def depth_profile(deadlocked_blocks: list[int], moe_blocks: list[int], depth: int) -> dict:
    """Deadlocked / MoE layers per third, and the shape: none | U | shallow | middle | deep | even."""
    thirds = {name: {"deadlocked": 0, "layers": 0} for name in THIRDS}
    for b in moe_blocks:
        thirds[depth_third(b, depth)]["layers"] += 1
    for b in set(deadlocked_blocks):
        thirds[depth_third(b, depth)]["deadlocked"] += 1
    frac = {n: v["deadlocked"] / v["layers"] for n, v in thirds.items() if v["layers"]}
    if not any(frac.values()):
        shape = "none"
    elif {"shallow", "deep"} <= frac.keys() and frac["shallow"] > 0 and frac["deep"] > 0 \
            and frac.get("middle", 0.0) < min(frac["shallow"], frac["deep"]):
        shape = "U"  # both ends, the middle less affected than either
    else:
        top = max(frac.values())
        leaders = [n for n, f in frac.items() if f == top]
        shape = leaders[0] if len(leaders) == 1 else "even"
    return {"thirds": thirds, "shape": shape}


@dataclass
class _Run:
    """One layer's current streak: steps so far, its first and last step, whether its event has fired."""

    steps: int = 0
    start: int | None = None
    last: int | None = None
    expert: int = -1
    fired: bool = False
    intervals: list = field(default_factory=list)  # finished [start, end] of fired streaks


class Detectors:
    def __init__(self, cfg: DiagnosticsConfig, blocks: list[int], depth: int):
        self.cfg, self.blocks, self.depth = cfg, blocks, depth
        self.deadlock = [_Run() for _ in blocks]
        self.saturation = [_Run() for _ in blocks]
        self.global_saturation = _Run()
        self.last_step = 0

    def _where(self, y: int) -> dict:
        b = self.blocks[y]
        return {"layer": y, "block": b, "depth": depth_third(b, self.depth)}

    def update(self, records: np.ndarray) -> list[dict]:
        """Feed records in step order; returns the events they start or end."""
        if len(records) == 0:
            return []
        events: list[dict] = []
        share_RY, top_RY = top1_share_RY(records), records["top1_YE"].argmax(-1)
        entropy, cosine = entropy_RY(records), probe_cos_RY(records)
        for r in range(len(records)):
            step, steps = int(records["step"][r]), int(records["steps"][r])
            for y in range(len(self.blocks)):
                events += self._deadlock(y, step, steps, share_RY[r, y], int(top_RY[r, y]))
            if records["probes"][r] > 0:
                for y in range(len(self.blocks)):
                    events += self._saturation(y, step, entropy[r, y], cosine[r, y])
                events += self._global(step)
            self.last_step = step
        return events

    def _deadlock(self, y: int, step: int, steps: int, share: float, expert: int) -> list[dict]:
        run, cfg = self.deadlock[y], self.cfg
        # NaN (no tokens) compares False: a gap ends the streak
        if share >= (cfg.deadlock_release if run.fired else cfg.deadlock_share):
            if run.start is None:
                run.start, run.expert = step - steps + 1, expert
            run.steps, run.last = run.steps + steps, step
            if not run.fired and run.steps >= cfg.deadlock_streak:
                run.fired = True
                return [{"step": step, "kind": "deadlock", **self._where(y), "start_step": run.start,
                         "expert": run.expert, "top1_share": round(float(share), 4)}]
            return []
        return self._end(run, "deadlock_end", y, step)

    def _saturation(self, y: int, step: int, entropy: float, cosine: float) -> list[dict]:
        run, cfg = self.saturation[y], self.cfg
        if entropy >= cfg.saturation_entropy and cosine >= cfg.saturation_cosine:
            if run.start is None:
                run.start = step
            run.steps, run.last = run.steps + 1, step
            if not run.fired and run.steps >= cfg.saturation_streak:
                run.fired = True
                return [{"step": step, "kind": "saturation", **self._where(y), "start_step": run.start,
                         "entropy": round(float(entropy), 4), "cosine": round(float(cosine), 4)}]
            return []
        return self._end(run, "saturation_end", y, step)

    def _global(self, step: int) -> list[dict]:
        run = self.global_saturation
        if all(s.fired for s in self.saturation):
            run.last = step
            if not run.fired:
                run.fired, run.start = True, step
                return [{"step": step, "kind": "global_saturation", "start_step": step, "layers": len(self.blocks)}]
            return []
        return self._end(run, "global_saturation_end", None, step)

    def _end(self, run: _Run, kind: str, y: int | None, step: int) -> list[dict]:
        event = []
        if run.fired:  # the interval ends at the last step the condition held
            run.intervals.append([run.start, run.last])
            event = [{"step": step, "kind": kind, **(self._where(y) if y is not None else {}),
                      "start_step": run.start, "end_step": run.last}]
        run.steps, run.start, run.last, run.fired = 0, None, None, False
        return event

    # ---- end of training

    def _intervals(self, run: _Run) -> list[list]:
        """Finished intervals plus the ongoing one (its end is null)."""
        return run.intervals + ([[run.start, None]] if run.fired else [])

    def summary(self) -> dict:
        deadlocked = {y: self._intervals(r) for y, r in enumerate(self.deadlock) if self._intervals(r)}
        saturated = {y: self._intervals(r) for y, r in enumerate(self.saturation) if self._intervals(r)}
        return {
            "last_step": self.last_step,
            "thresholds": {k: getattr(self.cfg, k) for k in (
                "deadlock_share", "deadlock_streak", "deadlock_release", "saturation_entropy", "saturation_cosine",
                "saturation_streak")},
            "deadlock": [{**self._where(y), "intervals": iv} for y, iv in deadlocked.items()],
            "saturation": [{**self._where(y), "intervals": iv} for y, iv in saturated.items()],
            "global_saturation": self._intervals(self.global_saturation),
            "depth_profile": depth_profile([self.blocks[y] for y in deadlocked], self.blocks, self.depth),
        }


def describe(event: dict, cfg: DiagnosticsConfig) -> str:
    """One log line for an event."""
    kind, where = event["kind"], ""
    if "layer" in event:
        where = f"MoE layer {event['layer']} (block {event['block']}, {event['depth']} third)"
    if kind == "deadlock":
        return (f"selective deadlock in {where}: expert {event['expert']} is the top choice of "
                f"{event['top1_share']:.0%} of tokens, ≥ {cfg.deadlock_share:.0%} since step {event['start_step']} "
                f"(≥ {cfg.deadlock_streak} steps)")
    if kind == "saturation":
        return (f"soft saturation in {where}: score entropy {event['entropy']:.3f} ≥ {cfg.saturation_entropy}, "
                f"expert outputs' mean cosine {event['cosine']:.4f} ≥ {cfg.saturation_cosine}, since step "
                f"{event['start_step']}")
    if kind == "global_saturation":
        return f"global soft saturation: all {event['layers']} MoE layers saturated at step {event['step']}"
    what = kind.removesuffix("_end").replace("_", " ")
    return f"{what} {'in ' + where + ' ' if where else ''}ended: steps {event['start_step']}-{event['end_step']}"


def summary_lines(summary: dict) -> list[str]:
    """The end-of-training summary as log lines."""
    lines = []
    for d in summary["deadlock"]:
        spans = ", ".join(f"{a}-{b if b is not None else 'end'}" for a, b in d["intervals"])
        lines.append(f"deadlocked: MoE layer {d['layer']} (block {d['block']}, {d['depth']}) steps {spans}")
    for s in summary["saturation"]:
        spans = ", ".join(f"{a}-{b if b is not None else 'end'}" for a, b in s["intervals"])
        lines.append(f"saturated: MoE layer {s['layer']} (block {s['block']}, {s['depth']}) probes at steps {spans}")
    if summary["global_saturation"]:
        lines.append(f"global soft saturation: {summary['global_saturation']}")
    if summary["deadlock"]:
        prof = summary["depth_profile"]
        counts = ", ".join(f"{n} {v['deadlocked']}/{v['layers']}" for n, v in prof["thirds"].items())
        lines.append(f"depth profile of deadlocked layers: {prof['shape']} ({counts})")
    if not lines:
        lines.append("no selective deadlock or soft saturation detected")
    return lines
