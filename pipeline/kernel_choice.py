"""Equal treatment: which of our kernels a served variant gets, chosen by measuring.

Every variant, the original included, is offered the same two kernels of ours and gets
each where it is faster on the device, measured on the benchmark's own batch:

- the pooled lookup (:mod:`afmrec.models.kernels.lookup`, tiling autotuned) against
  FBGEMM's inference kernel, on the variant's own rows (the original's 512-byte fp32
  rows as the AFM variants' narrow ones);
- the fused cross network (from the codes for AFM tables in serving form, else from the
  interaction in memory, :class:`~afmrec.models.fused_cross.X0CrossNet`) against the
  plain one, with the lookup chosen first.

The choice goes into the AOTInductor artifact (:func:`~afmrec.pipeline.export.
write_artifact`'s ``lookup`` and ``cross``); TorchScript holds neither kernel. On a CPU
neither runs (both are Triton kernels on CUDA): nothing is measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from afmrec.models.serving import DCNServing, FlatLookup, use_kernels_

from .export import ServingModule, call
from .runinfo import device_ms


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a variant is served with, and the measurements behind the choice.

    Attributes:
        lookup: ``triton`` (ours) or ``fbgemm``.
        cross: ``fused`` or ``plain``.
        cross_form: ``codes`` or ``x0`` (which fused form was offered), or None.
        lookup_ms: device milliseconds of the variant's lookups of one batch, by kernel.
        cross_ms: device milliseconds of a whole batch with each cross network.
        errors: a kernel of ours that failed to run, by kind (it is then not chosen).
    """

    lookup: str
    cross: str
    cross_form: str | None = None
    lookup_ms: dict[str, float] = field(default_factory=dict)
    cross_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def use_lookup(self) -> bool:
        return self.lookup == "triton"

    @property
    def use_cross(self) -> bool:
        return self.cross == "fused"


def choose_kernels(served: ServingModule, batch: Any, device: torch.device) -> KernelChoice:
    """Measures ``served``'s lookups with each kernel, then a whole batch with each cross
    network, and leaves ``served`` serving the faster of each (module docstring)."""
    if device.type != "cuda":
        use_kernels_(served, False)
        return KernelChoice("fbgemm", "plain")
    lookups = [m for m in served.modules() if isinstance(m, FlatLookup) and m.has_kernel]
    lookup_ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    if lookups:
        kjt = batch.sparse_features
        for kernel, on in (("fbgemm", False), ("triton", True)):
            use_kernels_(served, False, lookup=on)
            _measure(lookup_ms, errors, kernel, lambda: [m(kjt) for m in lookups], device, ours=on)
    lookup = min(lookup_ms, key=lookup_ms.get) if lookup_ms else "fbgemm"
    dcn = [m for m in served.modules() if isinstance(m, DCNServing)]
    form = None
    if dcn and dcn[0].fused is not None:
        form = "codes"
    elif dcn and dcn[0].fused_x0 is not None:
        form = "x0"
    cross_ms: dict[str, float] = {}
    if form is not None:
        for cross, on in (("plain", False), ("fused", True)):
            use_kernels_(served, False, lookup=lookup == "triton", cross=on)
            _measure(cross_ms, errors, cross, lambda: call(served, batch), device, ours=on)
    cross = min(cross_ms, key=cross_ms.get) if cross_ms else "plain"
    use_kernels_(served, False, lookup=lookup == "triton", cross=cross == "fused")
    return KernelChoice(lookup, cross, form, lookup_ms, cross_ms, errors)


def _measure(times: dict[str, float], errors: dict[str, str], name: str, fn: Any, device: torch.device,
             ours: bool) -> None:
    """``times[name]``: :func:`device_ms` of ``fn``; a kernel of ours that fails is recorded
    in ``errors`` instead (and so never chosen); a stock one's failure is raised."""
    try:
        times[name] = device_ms(fn, device)
    except Exception as e:  # noqa: BLE001  (recorded; the stock kernel serves)
        if not ours:
            raise
        errors[name] = f"{type(e).__name__}: {str(e)[:500]}"
