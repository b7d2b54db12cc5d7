"""A DeepFM-style model composed of TorchRec modules.

TorchRec's ``SimpleDeepFMNN`` needs dense features and has a one-layer deep part, and
TorchRec's ``FactorizationMachine`` flattens its fields first, so its "pairwise" term also
multiplies coordinates of one embedding with each other. This model keeps TorchRec's
``SparseArch``, ``DenseArch`` and ``MLP``, uses the field-wise FM of the DeepFM paper, and
lets the deep tower read the concatenated embeddings
directly, so a compressed model can feed it the low-rank codes instead (projection fused
into the first deep Linear: docs/compression.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .lowrank import LowRankEmbeddingBagCollection


class DeepFMSparseArch(SparseArch):
    """Embedding lookups returning the FM fields and the deep tower's input.

    Returns:
        ``(fields, deep_input)``: (B, F, D) and (B, F * D).
    """

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        fields = super().forward(features)
        return fields, fields.flatten(1)


class FusedDeepFMSparseArch(DeepFMSparseArch):
    """Low-rank lookups whose deep-tower input is the codes, not the projected fields.

    The deep tower's first Linear has the projections folded in (see
    ``afmrec.pipeline.compress``): it reads ``[z_1 .. z_F, m_1 .. m_F]``, the K-wide codes
    and the non-empty indicators that carry the projection biases.

    Returns:
        ``(fields, deep_input)``: (B, F, D) and (B, sum K + F).
    """

    embedding_bag_collection: LowRankEmbeddingBagCollection

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ebc = self.embedding_bag_collection
        codes, mask = ebc.forward_codes(features)
        fields = torch.stack(ebc.project(codes, mask), dim=1)
        return fields, torch.cat([codes.values(), mask], dim=1)


class FieldFactorizationMachine(nn.Module):
    """Second-order FM over fields: ``sum_{i<j} <e_i, e_j>``.

    Computed as ``0.5 * sum_d [(sum_f e_fd)^2 - sum_f e_fd^2]``.

    Args (forward): fields: (B, F, D). Returns: (B, 1).
    """

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).square()
        sum_of_square = fields.square().sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)


class DeepFM(nn.Module):
    """``logit = deep([dense_emb, e_1 .. e_F]) + FM(dense_emb, e_1 .. e_F)``.

    Args:
        embedding_bag_collection: F tables of width D.
        dense_in_features: N (0: no dense field).
        dense_arch_layer_sizes: bottom MLP, ending in D.
        deep_arch_layer_sizes: hidden sizes of the deep tower (a Linear to 1 follows).
        dense_device: device of the dense modules.

    Example::

        cfg = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["t"])
        model = DeepFM(EmbeddingBagCollection([cfg]), 0, [], [8])
        kjt = KeyedJaggedTensor.from_lengths_sync(["t"], torch.tensor([1, 2]), torch.tensor([1, 1]))
        model(torch.zeros(2, 0), kjt).shape  # (2, 1)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        deep_arch_layer_sizes: list[int],
        dense_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = DeepFMSparseArch(embedding_bag_collection)
        d, f = self.sparse_arch.D, self.sparse_arch.F
        self.dense_arch = (
            DenseArch(dense_in_features, dense_arch_layer_sizes, dense_device)
            if dense_in_features > 0
            else None
        )
        deep_in = (f + (self.dense_arch is not None)) * d
        self.deep_arch = nn.Sequential(
            MLP(deep_in, deep_arch_layer_sizes, device=dense_device),
            nn.Linear(deep_arch_layer_sizes[-1] if deep_arch_layer_sizes else deep_in, 1, device=dense_device),
        )
        self.fm = FieldFactorizationMachine()

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense_features: (B, N); sparse_features: KJT of F features. Returns: (B, 1)."""
        fields, deep_input = self.sparse_arch(sparse_features)
        if self.dense_arch is not None:
            dense = self.dense_arch(dense_features)
            fields = torch.cat([dense.unsqueeze(1), fields], dim=1)
            deep_input = torch.cat([dense, deep_input], dim=1)
        return self.deep_arch(deep_input) + self.fm(fields)
