"""DiT backbone, embeddings, dense FFNs and size presets."""

from moedit.config import ModelConfig
from moedit.models.dit import DiT
from moedit.models.presets import MODEL_PRESETS


def build_model(cfg: ModelConfig) -> DiT:
    return DiT(cfg)


__all__ = ["DiT", "MODEL_PRESETS", "build_model"]
