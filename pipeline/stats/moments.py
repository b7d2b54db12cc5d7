"""Sufficient statistics of block outputs: ``n``, ``sum y``, ``sum y y^T`` in float64.

:class:`Moments` are one block's sums, :func:`batch_moments` forms a batch's products in a
chosen precision (:data:`PRECISIONS`) and adds nothing it cannot bound, and
:class:`Statistics` are the moments of every block, mergeable over ranks and passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from afmrec.models.kernels.centring import RowGroups, add_recombined_, centre_round_sum

from ..errors import InputError


@dataclass
class Moments:
    """Sufficient statistics of one block's outputs ``y`` (m-dimensional), float64.

    Attributes:
        n: number of observed rows.
        s: ``sum y``, shape (m,).
        g: ``sum y y^T``, shape (m, m).
    """

    n: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor

    @classmethod
    def zeros(cls, m: int, device: torch.device | None = None) -> "Moments":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **z), torch.zeros(m, **z), torch.zeros(m, m, **z))

    def update_(self, y: torch.Tensor, precision: str = "float32") -> None:
        """Adds rows ``y`` of shape (R, m) (see :func:`batch_moments`)."""
        add_batch_moments_([t.unsqueeze(0) for t in self.tensors()], y.detach().unsqueeze(0), None,
                           precision)

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s + other.s, self.g + other.g)

    @property
    def mean(self) -> torch.Tensor:
        return self.s / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """Population covariance ``G / n - mu mu^T``, shape (m, m)."""
        mu = self.mean
        c = self.g / self.n - torch.outer(mu, mu)
        return (c + c.T) / 2

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.s, self.g]


PRECISIONS = ("float64", "float32", "bfloat16")
"""How :func:`batch_moments` forms a batch's products: every product in float64; or the
GEMM of centred rows in float32 (TF32 on CUDA where ``allow_tf32`` is on); or in
bfloat16 (half the bytes, twice the GEMM rate) with float32 accumulation. A pass may
also be asked for ``"auto"`` (:func:`resolve_precision`)."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device | None) -> str:
    """``precision``, with ``"auto"`` resolved for a pass on ``device``: bfloat16 on CUDA
    (within its proven bound, :func:`batch_moments`, and the fastest there: the GEMM of
    bfloat16 rows is about 4x the TF32 one), float32 elsewhere (a CPU has no fast
    bfloat16 GEMM, and rounding costs a pass)."""
    if precision == "auto":
        return "bfloat16" if device is not None and torch.device(device).type == "cuda" else "float32"
    check_precision(precision)
    return precision


def batch_moments(
    y: torch.Tensor, mask: torch.Tensor | None = None, precision: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n``, ``sum y`` and ``sum y y^T`` of G groups of rows at once, in float64.

    ``precision="float64"``: every product in float64 (a float64 GEMM costs more than the
    layer's own forward pass for wide blocks). Otherwise each group is centred at ``c``,
    the mean of its first :data:`~afmrec.models.kernels.centring.PILOT_ROWS` kept rows (0 if
    none is; any ``c`` gives the same algebra, a ``c`` near the mean gives small centred
    values), and the centred rows ``yc`` go through one batched GEMM and one sum; then,
    in float64, ``s = n c + t`` and ``G = Gc + c t^T + t c^T + n c c^T`` with ``t`` the
    sum of ``yc``, which is exact algebra
    (:func:`~afmrec.models.kernels.centring.centre_round_sum` centres, rounds and sums in one
    pass on CUDA, reading the rows where they lie). The roundings:

    - ``"float32"``: ``yc`` in float32 (TF32 inputs to the GEMM where CUDA's
      ``allow_tf32`` is on). Each entry of ``Gc`` is within ``gamma_R * sum_r |yc_ri|
      |yc_rj|`` and of ``t`` within ``gamma_R * sum_r |yc_ri|`` (``gamma_R = R u / (1 - R
      u)``, ``u = 2^-24``) of the true value, i.e. relative to the batch's spread, not to
      its mean.
    - ``"bfloat16"``: ``yc`` is rounded to bfloat16 (one pass that centres and rounds),
      which moves each entry by at most ``e |y - c|``, ``e = 2^-8 + 2^-24 + 2^-32``; the
      products of bfloat16 values are exact in float32 and are summed in float32, within
      ``gamma_R`` of the rounded rows' sums. So ``Gc`` is within ``(2e + e^2 + gamma_R
      (1 + e)^2) sum_r |yc_ri| |yc_rj|`` and ``t`` within ``(e + gamma_R (1 + e)) sum_r
      |yc_ri|``: the moments of rows each within ``e |y - c|`` of the true ones.

    In both, ``G`` carries ``t``'s error times ``c`` besides, which cancels in the
    covariance (tested). Sums over batches, ranks and jobs are float64.

    Masked rows must be zero in ``y`` (an empty bag pools to 0); they are left out of
    ``n``, of the centre and of the sums.

    Args:
        y: (G, R, m) rows (float64 ones go the float64 way whatever ``precision``), or
            :class:`~afmrec.models.kernels.centring.RowGroups` of float32 rows read in place.
        mask: (G, R) bool, the rows to count, or None for all.
        precision: one of :data:`PRECISIONS`.
    Returns:
        ``n`` (G,), ``s`` (G, m), ``g`` (G, m, m), float64.
    """
    return _recombined(*_batch_parts(y, mask, precision))


def _recombined(n: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, s, g)`` in float64 from the centred parts (see :func:`batch_moments`; ``t``
    holds the sums of S splits of the rows, (G, S, m))."""
    t64, c64 = t.to(torch.float64).sum(1), c.to(torch.float64)
    s = torch.addcmul(t64, n.unsqueeze(1), c64)
    # G = Gc + c t^T + t c^T + n c c^T = Gc + c w^T + w c^T with w = t + n c / 2
    w = torch.addcmul(t64, n.unsqueeze(1), c64, value=0.5).unsqueeze(2)
    c64 = c64.unsqueeze(2)
    g = torch.baddbmm(gc.to(torch.float64), c64, w.transpose(1, 2))
    return n, s, g.baddbmm_(w, c64.transpose(1, 2))


def add_batch_moments_(totals: Sequence[torch.Tensor], y: torch.Tensor,
                       mask: torch.Tensor | None = None, precision: str = "float32") -> None:
    """Adds :func:`batch_moments` of ``y`` to ``totals`` in place: ``n`` (G,), ``s`` (G, m)
    and ``g`` (G, m, m), float64.

    On CUDA with Triton the float64 part (``s = n c + t``, ``G = Gc + c w^T + w c^T``, the
    adds) is one kernel (:func:`~afmrec.models.kernels.centring.add_recombined_`) instead of a
    dozen small ones; elsewhere it is :func:`batch_moments` and three adds.
    """
    parts = _batch_parts(y, mask, precision)
    if not add_recombined_(totals, *parts):
        for total, part in zip(totals, _recombined(*parts)):
            total += part


def _batch_parts(y: torch.Tensor | RowGroups, mask: torch.Tensor | None,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, c, t, Gc)``: the count (G,) float64, the centre (G, m), the centred rows' sums
    over S splits of them (G, S, m) and their Gram matrix (G, m, m) (see
    :func:`batch_moments`); float32, or float64 with ``c = 0`` for float64 rows or
    products (the recombination then adds exact zeros). ``y`` is (G, R, m): a tensor, or
    :class:`RowGroups` (float32 rows; not for float64 products)."""
    check_precision(precision)
    groups, rows, _ = y.shape
    # (No shortcut for an all-true mask: testing for one would stall the GPU every batch.)
    if mask is None:
        n = torch.full((groups,), float(rows), dtype=torch.float64, device=y.device)
    else:
        n = mask.sum(1).to(torch.float64)
    if precision == "float64" or y.dtype == torch.float64:  # float64 rows stay float64
        y64 = y.to(torch.float64)
        return n, y64.new_zeros(y64.shape[::2]), y64.sum(1, keepdim=True), torch.bmm(y64.transpose(1, 2), y64)
    c, yc, t = centre_round_sum(y, mask, getattr(torch, precision))
    return n, c, t, _gram(yc)


def _gram(yc: torch.Tensor) -> torch.Tensor:
    """(G, m, m) float32 ``yc^T yc`` of (G, R, m) rows, float32 or bfloat16 ones (the latter
    with float32 products and sums: CUDA's bf16 GEMM with a float32 output; elsewhere the
    rows widened to float32 first, which is exact)."""
    if yc.dtype == torch.bfloat16:
        if yc.is_cuda:
            return torch.bmm(yc.transpose(1, 2), yc, out_dtype=torch.float32)
        yc = yc.to(torch.float32)
    return torch.bmm(yc.transpose(1, 2), yc)


@dataclass
class Statistics:
    """Moments by block name, plus a metadata record (model, data, versions)."""

    moments: dict[str, Moments]
    meta: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "Statistics") -> "Statistics":
        """Adds statistics computed over disjoint data (other ranks, jobs or shards)."""
        if set(self.moments) != set(other.moments):
            diff = sorted(set(self.moments) ^ set(other.moments))
            raise InputError(f"statistics cover different blocks: {diff}")
        merged = {k: self.moments[k].merge(other.moments[k]) for k in sorted(self.moments)}
        return Statistics(merged, dict(self.meta))

    def all_reduce_(self, group: Any = None) -> None:
        """Sums the moments over all ranks: one all-reduce per block, in sorted name order,
        so every rank (also one that saw no data) issues the same collectives."""
        import torch.distributed as dist

        for name in sorted(self.moments):
            m = self.moments[name]
            flat = torch.cat([t.reshape(-1) for t in m.tensors()])
            dist.all_reduce(flat, group=group)
            k = m.s.numel()
            m.n.copy_(flat[0])
            m.s.copy_(flat[1 : 1 + k])
            m.g.copy_(flat[1 + k :].view(k, k))

    def check_finite(self) -> None:
        for name, m in self.moments.items():
            if int(m.n) == 0:
                raise InputError(f"block {name}: no samples were observed")
            if not all(torch.isfinite(t).all() for t in m.tensors()):
                raise InputError(f"block {name}: statistics hold NaN or Inf")

    def to_state(self) -> dict[str, Any]:
        return {"moments": moments_state(self.moments), "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Statistics":
        return cls(moments_from_state(state["moments"]), state.get("meta", {}))


def moments_state(moments: Mapping[str, Moments]) -> dict[str, dict[str, torch.Tensor]]:
    """Moments by name as plain CPU tensors (what ``torch.save`` writes). Each is a copy of
    its own: moments may be views of a stack, which ``torch.save`` would write whole."""
    return {k: {"n": m.n.cpu().clone(), "s": m.s.cpu().clone(), "g": m.g.cpu().clone()}
            for k, m in moments.items()}


def moments_from_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Moments]:
    """The inverse of :func:`moments_state`."""
    return {k: Moments(**v) for k, v in state.items()}
