"""Builds a model from a :class:`~afmrec.models.config.ModelConfig`."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from .config import ModelConfig
from .cross import CrossNet
from .deepfm import DeepFM


def table_configs(config: ModelConfig) -> list[EmbeddingBagConfig]:
    """TorchRec table configs: one table per sparse feature, of the same name."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=config.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=[t.name],
        )
        for t in config.tables
    ]


def build_model(
    config: ModelConfig,
    device: torch.device | str | None = None,
    sparse_device: torch.device | str | None = None,
) -> nn.Module:
    """Builds the model; its forward maps ``(dense (B, N), KJT)`` to logits (B, 1).

    Args:
        config: the model configuration.
        device: device of the dense modules.
        sparse_device: device of the embedding tables (``"meta"`` when DMP will
            materialise them); defaults to ``device``.

    Example::

        cfg = ModelConfig("dlrm", (TableSpec("t0", 10), TableSpec("t1", 20)), num_dense=3,
                          embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1))
        model = build_model(cfg)
    """
    device = torch.device(device) if device is not None else None
    sparse_device = torch.device(sparse_device) if sparse_device is not None else device
    ebc = EmbeddingBagCollection(tables=table_configs(config), device=sparse_device)
    if config.arch == "deepfm":
        return DeepFM(ebc, config.num_dense, list(config.dense_arch), list(config.deep_arch), device)
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=config.num_dense,
        dense_arch_layer_sizes=list(config.dense_arch),
        over_arch_layer_sizes=list(config.over_arch),
        dense_device=device,
    )
    if config.arch == "dcn":
        model = DLRM_DCN(
            **common,
            dcn_num_layers=config.dcn_num_layers,
            dcn_low_rank_dim=config.dcn_low_rank_dim,
        )
        # TorchRec's cross network hides its kernels in ParameterLists (and is built without
        # a device): the same network of nn.Linear blocks, with the dense part, is what the
        # block finder sees and compression factors.
        model.inter_arch.crossnet = CrossNet.from_lowrank_crossnet(model.inter_arch.crossnet, device)
        return model
    return DLRM(**common)
