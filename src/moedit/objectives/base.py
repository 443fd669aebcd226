"""What every training objective shares: the regression loss on its own training target.

An objective draws, for a batch of data x0, a noisy input, its time and the regression target
(`training_target`); the loss is the mean squared error of the model's prediction against it:

    (x_noisy, t, target) = training_target(x0),   L = mean ‖model(x_noisy, t, y)[:, :C] − target‖²

formed in float32 (the model may run under bf16 autocast). Only the first C = target channels are
compared: a model with more outputs (DiT's learned sigma) keeps its extra ones untrained.
"""

from __future__ import annotations

import torch


class Objective:
    prediction_kind: str  # what the model predicts ("velocity", "epsilon"); the samplers check it

    def training_target(self, x0_BCHW: torch.Tensor, generator: torch.Generator | None = None):
        """(x_noisy_BCHW, t_B, target_BCHW): one draw for a batch of data."""
        raise NotImplementedError

    def loss(self, model_fn, x0_BCHW: torch.Tensor, y_B: torch.Tensor,
             generator: torch.Generator | None = None, pass_target: bool = False) -> tuple[torch.Tensor, dict]:
        """Scalar MSE and info {"t_B", "loss_B"} (per-sample losses, detached, for loss-vs-t plots).
        pass_target: the model also sees the target (`target=`), for per-layer regularisation heads (race)."""
        x_noisy_BCHW, t_B, target_BCHW = self.training_target(x0_BCHW.float(), generator)
        extra = {"target": target_BCHW} if pass_target else {}
        pred_BCHW = model_fn(x_noisy_BCHW, t_B, y_B, **extra)[:, : target_BCHW.shape[1]]
        loss_B = (pred_BCHW.float() - target_BCHW).square().flatten(1).mean(1)
        return loss_B.mean(), {"t_B": t_B, "loss_B": loss_B.detach()}
