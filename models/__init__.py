"""Model builders, the DCN cross network and low-rank modules (no ``torch.distributed``,
no file I/O)."""

from .builders import build_model, table_configs
from .config import ARCHS, ModelConfig, TableSpec
from .cross import CrossLayer, CrossNet
from .deepfm import DeepFM, DeepFMSparseArch, FusedDeepFMSparseArch
from .lowrank import LowRankEmbeddingBagCollection, LowRankLinear, nonempty_mask, residual_bias

__all__ = [
    "ARCHS",
    "CrossLayer",
    "CrossNet",
    "DeepFM",
    "DeepFMSparseArch",
    "FusedDeepFMSparseArch",
    "LowRankEmbeddingBagCollection",
    "LowRankLinear",
    "ModelConfig",
    "TableSpec",
    "build_model",
    "nonempty_mask",
    "residual_bias",
    "table_configs",
]
