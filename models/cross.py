"""DCNv2's low-rank cross network made of ``nn.Linear`` blocks.

TorchRec's ``LowRankCrossNet`` keeps its kernels as raw ``ParameterList`` entries, so the
block finder (every ``nn.Linear`` and every table) never sees them. :class:`CrossNet`
computes the same function (bit for bit on CPU, tested) with one :class:`CrossLayer` per
layer whose two kernels are ``nn.Linear`` modules: ``down`` (``V_l``, N -> r, no bias)
and ``up`` (``W_l`` and ``b_l``, r -> N). Compression then swaps them like any other
Linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet


class CrossLayer(nn.Module):
    """One cross layer: ``x_{l+1} = x_0 * up(down(x_l)) + x_l``.

    ``down`` and ``up`` are created uninitialised (:func:`torch.nn.utils.skip_init`):
    :class:`CrossNet` initialises them as TorchRec does, or copies trained kernels.
    Compression may later replace either by another module of the same input and output
    widths.

    Args:
        in_features: N, the width of ``x_0`` and ``x_l``.
        low_rank: r.
        device: where the weights live.

    Attributes:
        down: ``nn.Linear(N, r, bias=False)``, weight (r, N) = ``V_l``.
        up: ``nn.Linear(r, N)``, weight (N, r) = ``W_l``, bias (N,) = ``b_l``.
    """

    def __init__(
        self, in_features: int, low_rank: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        device = torch.device(device) if device is not None else torch.get_default_device()
        self.down = nn.utils.skip_init(nn.Linear, in_features, low_rank, bias=False, device=device)
        self.up = nn.utils.skip_init(nn.Linear, low_rank, in_features, device=device)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Args: x0: (B, N) the network's input; x: (B, N) this layer's input.
        Returns: (B, N)."""
        return x0 * self.up(self.down(x)) + x


class CrossNet(nn.Module):
    """Drop-in replacement of TorchRec's ``LowRankCrossNet`` made of ``nn.Linear`` blocks.

    Per layer ``l``: ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l``.

    Args:
        in_features: N (the interaction width, ``(F + 1) * D`` in ``DLRM_DCN``).
        num_layers: number of cross layers.
        low_rank: r, the rank of each layer's ``W_l V_l``.
        device: where the weights live.

    Example::

        net = CrossNet(in_features=12, num_layers=2, low_rank=3)
        net(torch.randn(5, 12)).shape  # (5, 12)
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        low_rank: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if low_rank < 1:
            raise ValueError(f"low_rank must be >= 1, got {low_rank}")
        self.layers = nn.ModuleList(
            [CrossLayer(in_features, low_rank, device) for _ in range(num_layers)]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TorchRec's initialisation, in its order (every ``W``, every ``V``, then the
        biases): ``xavier_normal_`` kernels and zero biases, so that under the same seed
        a fresh ``CrossNet`` has the weights of a fresh ``LowRankCrossNet``."""
        with torch.no_grad():
            for layer in self.layers:
                nn.init.xavier_normal_(layer.up.weight)
            for layer in self.layers:
                nn.init.xavier_normal_(layer.down.weight)
            for layer in self.layers:
                nn.init.zeros_(layer.up.bias)
                if layer.down.bias is not None:  # a compressed layer's first factor
                    nn.init.zeros_(layer.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, N). Returns: (B, N)."""
        x0 = x
        for layer in self.layers:
            x = layer(x0, x)
        return x

    @classmethod
    def from_lowrank_crossnet(
        cls, crossnet: LowRankCrossNet, device: torch.device | str | None = None
    ) -> "CrossNet":
        """The same network with ``V_kernels[l]`` -> ``layers[l].down.weight``,
        ``W_kernels[l]`` -> ``layers[l].up.weight`` and ``bias[l]`` -> ``layers[l].up.bias``
        (exact copies; the random number generator is not used).

        Args:
            crossnet: TorchRec's network, kernels V (r, N) and W (N, r), biases (N,).
            device: where the copy lives (default: where ``crossnet`` is).
        """
        kernels = list(zip(crossnet.V_kernels, crossnet.W_kernels, crossnet.bias))
        if not kernels:
            return cls(0, 0, crossnet._low_rank, device)
        v0 = kernels[0][0]
        low_rank, in_features = v0.shape
        # Built on `meta` so that the initialisation draws no random numbers.
        out = cls(in_features, len(kernels), low_rank, device="meta").to(v0.dtype)
        out = out.to_empty(device=device if device is not None else v0.device)
        with torch.no_grad():
            for layer, (v, w, b) in zip(out.layers, kernels):
                layer.down.weight.copy_(v)
                layer.up.weight.copy_(w)
                layer.up.bias.copy_(b)
        return out
