"""A training step asks the device nothing: no .item(), .tolist(), bool/int/float of a tensor, nonzero(),
boolean-mask indexing, or the operations that read a tensor back inside C++ (bincount reads its input's
min and max, unique its size, repeat_interleave its repeats), for every router on the grouped backend
and for token choice and race on the fused one. On a GPU each of those would stall
the host until the queued kernels finish. (The loop backend needs the per-expert counts on the host
by design; log steps read the device once per window, outside `train_step`.)"""

from __future__ import annotations

import sys

import pytest
import torch

from moedit.config import from_dict
from moedit.moe import glue_triton
from moedit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROUTERS = [("topk", {}), ("expert_choice", {"capacity": 2.0}), ("diffmoe", {"capacity": 2.0}), ("race", {}),
           ("promoe", {"top_k": 1}), ("topk", {"score": "sigmoid", "selection_bias": True, "normalize": True})]


class HostSync(AssertionError):
    pass


@pytest.fixture
def forbid_syncs(monkeypatch):
    def refuse(owner, name):
        original = getattr(owner, name)

        def fn(*args, **kwargs):
            # torch.optim reads its step counters, which live on the host even when training on a GPU;
            # Triton's interpreter (the fused backend's kernels on CPU) copies tensors to numpy by design
            if sys._getframe(1).f_globals.get("__name__", "").startswith(("torch.optim", "triton")):
                return original(*args, **kwargs)
            raise HostSync(f"{name} was called inside train_step")
        return fn

    def arm():
        getitem = torch.Tensor.__getitem__

        def no_mask_indexing(self, index):  # x[mask] runs nonzero() in C++, out of reach of the patches above
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                raise HostSync("boolean-mask indexing inside train_step")
            return getitem(self, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask_indexing)
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, refuse(torch.Tensor, name))
        monkeypatch.setattr(torch, "nonzero", refuse(torch, "nonzero"))
        for name in ("bincount", "unique"):
            monkeypatch.setattr(torch, name, refuse(torch, name))
        for owner in (torch, torch.Tensor):
            original = owner.repeat_interleave

            def repeat_interleave(*args, _original=original, **kwargs):
                repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
                if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
                    raise HostSync("repeat_interleave with tensor repeats and no output_size inside train_step")
                return _original(*args, **kwargs)
            monkeypatch.setattr(owner, "repeat_interleave", repeat_interleave)
    return arm


# the fused backend's kernels on CPU tensors need Triton's interpreter (tests/conftest.py)
FUSED = pytest.mark.skipif(glue_triton.unavailable_reason(torch.device("cpu")) is not None,
                           reason="Triton's interpreter is off or triton is not installed")
CASES = [(r, extra, "grouped") for r, extra in ROUTERS] + [pytest.param("topk", {}, "fused", marks=FUSED),
                                                           pytest.param("race", {}, "fused", marks=FUSED)]


@pytest.mark.parametrize("router, extra, backend", CASES,
                         ids=[r for r, _ in ROUTERS[:-1]] + ["deepseek_bias", "topk_fused", "race_fused"])
def test_train_step_has_no_host_sync(tmp_path, forbid_syncs, router, extra, backend):
    cfg = from_dict({
        "model": {"preset": "micro", "moe": {"num_experts": 4, "expert_ratio": 1.0, "backend": backend,
                                              "router": {"name": router, "top_k": 2, **extra}}},
        "data": {"name": "synthetic"},
        # fused: one image, as Triton's interpreter runs each kernel program in Python here
        "train": {"out_dir": str(tmp_path), "steps": 4, "batch_size": 1 if backend == "fused" else 4, "ckpt_every": 0,
                  "log_every": 2},
    })
    trainer = Trainer(cfg, progress=False)
    trainer.train_step(0)  # first step: lazy set-up (optimizer state, monitor buffers) may look at the host
    forbid_syncs()
    logs = trainer.train_step(1)
    assert set(logs) >= {"loss", "grad_norm"} and all(isinstance(v, torch.Tensor) for v in logs.values())
