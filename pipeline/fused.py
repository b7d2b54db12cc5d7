"""TorchRec's fused sparse optimizer for a model trained in one process.

Under ``DistributedModelParallel`` the tables are FBGEMM "table batched embeddings" whose
optimizer runs inside the backward pass and touches only the rows a batch looked up
(see :mod:`afmrec.sharding.dmp`). A model trained in one process has plain
``EmbeddingBagCollection`` s instead, whose dense gradients make every step cost the
size of every table. :func:`fused_tables` gives such a model the same fused path for the
duration of training: each ``EmbeddingBagCollection`` is swapped for TorchRec's
``FusedEmbeddingBagCollection`` (same table configs, same weights, the same state-dict
keys), and swapped back, with the trained weights, when the block ends.

The optimizer is Adagrad, FBGEMM's ``EXACT_ADAGRAD``: per row and column
``G += g^2; w -= lr * g / (sqrt(G) + eps)``, the update of ``torch.optim.Adagrad``
(without decay) on the rows a batch touched, for the others the dense update is a no-op.
FBGEMM's default ``eps`` is 1e-8 and torch's 1e-10: it is passed explicitly
(:data:`ADAGRAD_EPS`), so both paths train alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
from torchrec.optim.keyed import KeyedOptimizer

# torch.optim.Adagrad's default eps, given to both optimizers of the tables.
ADAGRAD_EPS = 1e-10


@dataclass
class _Swap:
    parent: nn.Module
    name: str
    original: EmbeddingBagCollection
    fused: FusedEmbeddingBagCollection


@contextlib.contextmanager
def fused_tables(model: nn.Module, lr: float, eps: float = ADAGRAD_EPS) -> Iterator[list[FusedEmbeddingBagCollection]]:
    """Trains ``model``'s tables with TorchRec's fused Adagrad inside the block.

    Every ``EmbeddingBagCollection`` of ``model`` (a compressed model's K-wide code
    tables included) whose tables are all multiples of 4 wide (FBGEMM's kernels need it)
    is replaced by a ``FusedEmbeddingBagCollection`` holding its weights, on the same
    device; when the block ends (also on an error) the originals are
    put back, holding the fused modules' weights. The fused modules' parameters must not
    be given to another optimizer (:func:`fused_parameter_ids`).

    Args:
        model: an unsharded model (a sharded one has no ``EmbeddingBagCollection``).
        lr: Adagrad's learning rate.
        eps: Adagrad's epsilon.

    Yields:
        The fused modules, whose ``fused_optimizer`` s hold their learning rates.
    """
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in parent.named_children() if _fusable(child)]
    devices = {p.device for _, _, child in found for p in child.parameters()}
    cuda = [d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda"]
    # The fused modules initialise their weights at random before taking the originals':
    # that draws on a forked RNG, so the caller's random stream is the same either way.
    with torch.random.fork_rng(devices=cuda):
        swaps = [_Swap(parent, name, child, _fused_copy(child, lr, eps)) for parent, name, child in found]
    for s in swaps:
        setattr(s.parent, s.name, s.fused)
    try:
        yield [s.fused for s in swaps]
    finally:
        for s in reversed(swaps):
            with torch.no_grad():
                s.original.load_state_dict(s.fused.state_dict())
            setattr(s.parent, s.name, s.original)


def _fusable(module: nn.Module) -> bool:
    """A plain ``EmbeddingBagCollection`` whose tables FBGEMM's kernels take: widths that
    are multiples of 4 (a compressed model's odd ranks are not). Other collections keep
    dense gradients and ``torch.optim.Adagrad``, which compute the same update."""
    return type(module) is EmbeddingBagCollection and all(
        t.embedding_dim % 4 == 0 for t in module.embedding_bag_configs())


def _fused_copy(ebc: EmbeddingBagCollection, lr: float, eps: float) -> FusedEmbeddingBagCollection:
    device = next(ebc.parameters()).device
    fused = FusedEmbeddingBagCollection(
        ebc.embedding_bag_configs(),
        optimizer_type=torch.optim.Adagrad,
        optimizer_kwargs={"lr": lr, "eps": eps},
        device=device,
    )
    fused.load_state_dict(ebc.state_dict())
    return fused


def fused_optimizers(model: nn.Module) -> list[KeyedOptimizer]:
    """The ``fused_optimizer`` of every ``FusedEmbeddingBagCollection`` in ``model``.

    (A sharded model's fused tables are reached through ``DistributedModelParallel``'s
    own ``fused_optimizer``, not here.)
    """
    out = []
    for module in model.modules():
        if isinstance(module, FusedEmbeddingBagCollection):
            optimizer = module.fused_optimizer
            out.append(optimizer() if callable(optimizer) else optimizer)
    return out


def fused_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter of a ``FusedEmbeddingBagCollection`` in ``model``: its
    own optimizer updates it, no other may."""
    return {id(p) for module in model.modules() if isinstance(module, FusedEmbeddingBagCollection)
            for p in module.parameters()}
