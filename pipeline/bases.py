"""PCA of block outputs and the bases that compression folds into the weights.

A :class:`Basis` is what :func:`afmrec.pipeline.compress.compress_` needs for one block:
``components`` ``U`` (m x K, orthonormal columns) and a ``center`` ``c`` (m,), so that
``y ~= U U^T (y - c) + c``. AFM takes the top eigenvectors of the output covariance and
the output mean; the weight-SVD baseline takes the top left singular vectors of ``W`` and
the bias (what ``y`` is at ``x = 0``), which gives the truncated SVD of ``W`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .blocks import Block
from .errors import InputError
from .stats import Moments, Statistics


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of one block's output covariance.

    Attributes:
        eigenvalues: (m,), descending, float64, clamped at 0.
        eigenvectors: (m, m), column i belongs to eigenvalue i.
        mean: (m,).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean: torch.Tensor

    def energy(self, k: int) -> float:
        """Fraction of the variance the top ``k`` directions keep (1.0 if none)."""
        total = float(self.eigenvalues.sum())
        return 1.0 if total <= 0 else float(self.eigenvalues[:k].sum()) / total


def pca(moments: Moments) -> Spectrum:
    """``C = U L U^T`` with eigenvalues in descending order (``torch.linalg.eigh``, float64)."""
    if int(moments.n) == 0:
        raise InputError("cannot compute PCA of a block with no samples")
    evals, evecs = torch.linalg.eigh(moments.covariance)
    return Spectrum(evals.flip(0).clamp_min(0), evecs.flip(1), moments.mean)


def spectra(stats: Statistics) -> dict[str, Spectrum]:
    """The spectrum of every block of ``stats``.

    Raises:
        InputError: a block has no samples, non-finite moments, or a covariance whose
            eigen-decomposition fails, naming the block.
    """
    stats.check_finite()
    out = {}
    for name, m in sorted(stats.moments.items()):
        try:
            out[name] = pca(m)
        except (InputError, torch.linalg.LinAlgError) as e:
            raise InputError(f"block {name}: {e}") from None
    return out


@dataclass
class Basis:
    """Compression basis of one block: ``components`` (m, K) and ``center`` (m,)."""

    components: torch.Tensor
    center: torch.Tensor

    @property
    def rank(self) -> int:
        return self.components.shape[1]


@dataclass
class Bases:
    """Bases by block name, with the method that made them and a metadata record."""

    bases: dict[str, Basis]
    method: str = "afm"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: b.rank for k, b in self.bases.items()}

    @classmethod
    def placeholders(cls, blocks: list[Block], ranks: Mapping[str, int]) -> "Bases":
        """Zero bases of the right shapes: rebuild a compressed model's structure
        before loading its checkpoint."""
        by_name = {b.name: b for b in blocks}
        missing = sorted(set(ranks) - set(by_name))
        if missing:
            raise InputError(f"the model has no blocks named {missing}")
        return cls(
            {
                n: Basis(torch.zeros(by_name[n].out_features, k), torch.zeros(by_name[n].out_features))
                for n, k in ranks.items()
            },
            method="placeholder",
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "bases": {k: {"components": b.components, "center": b.center} for k, b in self.bases.items()},
            "method": self.method,
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Bases":
        return cls(
            {k: Basis(**v) for k, v in state["bases"].items()}, state["method"], state.get("meta", {})
        )


def afm_bases(spectra_by_block: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> Bases:
    """AFM: the top-``k`` principal directions of each block's outputs, centred at the mean."""
    return Bases(
        {
            name: Basis(spectra_by_block[name].eigenvectors[:, :k].clone(), spectra_by_block[name].mean.clone())
            for name, k in sorted(ranks.items())
        },
        method="afm",
    )


def block_weight(model: nn.Module, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (m, n) and ``b`` (m,) of a block, float64 (for a table ``W = E^T``, ``b = 0``)."""
    module = model.get_submodule(block.module)
    if block.kind == "linear":
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else torch.zeros(w.shape[0])
        return w, b
    e = module.embedding_bags[block.table].weight.detach().double()
    return e.T, torch.zeros(e.shape[1], dtype=torch.float64)


def weight_svd_bases(model: nn.Module, blocks: list[Block], ranks: Mapping[str, int]) -> Bases:
    """Weight-SVD baseline: ``U`` = top-``k`` left singular vectors of ``W``, centre ``b``.

    Folding then gives ``W1 = S_k V_k^T``, ``b1 = U_k^T b``, ``W2 = U_k``,
    ``b2 = (I - U_k U_k^T) b``, i.e. ``y = U_k U_k^T W x + b``: the truncated SVD of ``W``
    with the bias kept whole.
    """
    by_name = {b.name: b for b in blocks}
    out = {}
    for name, k in sorted(ranks.items()):
        w, b = block_weight(model, by_name[name])
        # Left singular vectors of W are the eigenvectors of W W^T (m x m): cheap for a
        # table (D x D) however many rows it has.
        _, u = torch.linalg.eigh(w @ w.T)
        out[name] = Basis(u.flip(1)[:, :k].clone(), b)
    return Bases(out, method="svd")
