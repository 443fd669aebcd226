"""The one routing contract every router returns, and the context a router may read.

A `Routing` is a flat list of M assignments (token i, expert e, weight w) over the N = B·L tokens of
the local batch, of any length: a token may appear 0..E times (token choice gives exactly k, expert
choice and race give 0..E). One dispatcher (dispatch.py) executes it:

    y_i = Σ_{(i, e, w)} w · Expert_e(x_i)

Auxiliary losses are returned unweighted, by name; the trainer weights and sums them in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def count_ids(ids_M: torch.Tensor, n: int, weights_M: torch.Tensor | None = None) -> torch.Tensor:
    """How often each id in [0, n) occurs (int64; summed `weights_M` if given), as torch.bincount with
    minlength n, but without host synchronisation: on CUDA bincount reads its input's min and max back
    to the host to size its output; here the size is n and the counts are a scatter-add."""
    if weights_M is None:
        return torch.zeros(n, dtype=torch.long, device=ids_M.device).scatter_add_(0, ids_M, torch.ones_like(ids_M))
    return torch.zeros(n, dtype=weights_M.dtype, device=ids_M.device).scatter_add_(0, ids_M, weights_M)


@dataclass
class RoutingContext:
    """What a router may know besides the tokens themselves.

    cond_BSD: the sample's conditioning tokens (timestep and class embeddings), for cross-attention
    gates; labels_B: the labels after classifier-free dropout (null label = num_classes);
    target_BLP: the training target patchified like the model's output (B, L, p²·C), given only in
    training, for routers with a per-layer regularisation head (race); t_B: the diffusion times of
    the batch (the routing monitor buckets decisions by them; no router reads them yet); frames: the
    number of temporal token positions of a video model (1 for images). Tokens are in (frame, row,
    column) order, so token l of a sample lies in frame l // (seq_len // frames).
    """

    batch: int
    seq_len: int
    cond_BSD: torch.Tensor | None = None
    labels_B: torch.Tensor | None = None
    null_label: int | None = None
    target_BLP: torch.Tensor | None = None
    t_B: torch.Tensor | None = None
    frames: int = 1

    def frame_L(self, device: torch.device) -> torch.Tensor:
        """The frame index of each of a sample's seq_len tokens (all 0 for images)."""
        return torch.arange(self.seq_len, device=device) // (self.seq_len // self.frames)

    def null_tokens_N(self, device: torch.device) -> torch.Tensor:
        """True for every token of a null-label sample (all False for a model without labels)."""
        if self.labels_B is None or self.null_label is None:
            return torch.zeros(self.batch * self.seq_len, dtype=torch.bool, device=device)
        return (self.labels_B == self.null_label).repeat_interleave(self.seq_len)


@dataclass
class Routing:
    token_M: torch.Tensor  # int64 token index in [0, N)
    expert_M: torch.Tensor  # int64 expert index in [0, E)
    weight_M: torch.Tensor  # combine weight (differentiable), float32
    num_tokens: int
    num_experts: int
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted auxiliary losses
    scores_NE: torch.Tensor | None = None  # raw gate scores, detached, for diagnostics
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached statistics
    # k when every token has exactly k assignments in token-major order (token_M = arange(N).repeat_interleave(k)),
    # as token choice and top-1 ProMoE emit: dispatch then combines by a reshape-and-sum instead of a scatter
    per_token: int | None = None

    def __post_init__(self) -> None:
        m = self.token_M.shape[0]
        if self.expert_M.shape != (m,) or self.weight_M.shape != (m,):
            raise ValueError(
                f"Routing needs token_M, expert_M and weight_M of one length M; got "
                f"{tuple(self.token_M.shape)}, {tuple(self.expert_M.shape)}, {tuple(self.weight_M.shape)}"
            )
        if self.per_token is not None and m != self.per_token * self.num_tokens:
            raise ValueError(f"per_token={self.per_token} needs M = {self.per_token} x {self.num_tokens} assignments, got {m}")

    @classmethod
    def from_assignments(cls, token_M: torch.Tensor, expert_M: torch.Tensor, weight_M: torch.Tensor, num_tokens: int,
                         num_experts: int, aux: dict[str, torch.Tensor], scores_NE: torch.Tensor,
                         per_token: int | None = None) -> "Routing":
        """The usual way a router finishes: scores detached for diagnostics, load per expert as its stat."""
        return cls(token_M=token_M, expert_M=expert_M, weight_M=weight_M, num_tokens=num_tokens,
                   num_experts=num_experts, aux=aux, scores_NE=scores_NE.detach(),
                   stats={"load_E": count_ids(expert_M, num_experts)}, per_token=per_token)

    def load_E(self) -> torch.Tensor:
        """Assignments per expert (int64)."""
        return count_ids(self.expert_M, self.num_experts)

    def experts_per_token_N(self) -> torch.Tensor:
        return count_ids(self.token_M, self.num_tokens)
