"""How much each block's truncation costs in loss: the weights of the ``loss`` rank policy.

Retained variance alone misjudges blocks: a hidden layer can keep 99% of its output
variance and still cost more AUC than a table cut to a quarter of its variance. So each
block is truncated *alone* to a few ranks (its output replaced by the rank-``k``
reconstruction ``mu + U_k U_k^T (y - mu)`` that its AFM factors compute, every other block
whole), and the loss that costs on calibration rows is measured: the logloss of the
truncated model against the original's own predictions, less the original's, which is the
mean KL divergence ``KL(p || p_k)`` of the two Bernoulli predictions. Against the
original's predictions rather than the labels: it is never negative, it has no label
noise (on MovieLens-1M, truncating a hidden layer lowered the labelled validation loss
while it cost 0.002 test AUC), and it needs no labels. The increase per unit of dropped
(normalised) variance becomes the block's weight:

    w_b = sum_k d_bk * dL_bk / sum_k d_bk^2       (least squares through the origin)

with ``d_bk = 1 - energy_b(k)`` and ``dL_bk`` the loss increase at rank ``k``. The greedy of
:func:`afmrec.pipeline.ranks.select_ranks` multiplies variance gains by ``w_b``, so it
spends the budget where a byte saves the most estimated loss rather than the most variance.

The truncation is a forward hook on the block's output, where the statistics pass observes
it (a Linear's output; a table's pooled field where the dense part reads it, empty bags
left at 0 as the compressed table leaves them), so it runs on a sharded model as on a
plain one, and equals compressing the block alone (tested).

Example::

    probes = measure_sensitivity(model, blocks, spec, labelled_batches)
    plan = select_ranks(blocks, spec, RankConfig(ratio=8, weights=sensitivity_weights(probes)))
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from .bases import Spectrum
from .blocks import Block, table_hooks
from .errors import InputError
from .ranks import energy_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    """Which ranks to probe, and how to turn the probes into weights.

    Args:
        energies: each block is probed at the smallest ranks keeping these fractions of
            its output variance (distinct ranks only, below full rank).
        floor: a weight is at least ``floor`` times the mean weight, so that a block whose
            truncation showed no loss increase on the calibration rows is still not free.
        rows: at most this many calibration rows (``None``: all); the probes cost one
            forward pass over them each, about four a block.
        fraction: where no probe data is given, the probes run on the last this
            fraction of the calibration data (``afmrec stats`` and ``afmrec.compress_``).
    """

    energies: tuple[float, ...] = (0.7, 0.9, 0.97, 0.99)
    floor: float = 0.05
    rows: int | None = 16_384
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.energies or not all(0 < e < 1 for e in self.energies):
            raise InputError(f"sensitivity energies must be in (0, 1), got {self.energies}")
        if self.floor < 0:
            raise InputError(f"sensitivity floor must be >= 0, got {self.floor}")
        if self.rows is not None and self.rows < 1:
            raise InputError(f"probe rows must be >= 1, got {self.rows}")
        if not 0 < self.fraction <= 1:
            raise InputError(f"probe fraction must be in (0, 1], got {self.fraction}")


@dataclass(frozen=True)
class Probe:
    """One block truncated alone.

    Attributes:
        block: the block's name.
        rank: the rank it was cut to.
        dropped: fraction of its output variance the rank drops (``1 - energy``).
        delta_loss: the loss the truncation adds on the calibration rows, against the
            original's predictions: mean ``KL(p || p_k)``.
    """

    block: str
    rank: int
    dropped: float
    delta_loss: float


def probe_ranks(spectrum: Spectrum, energies: Iterable[float], max_rank: int) -> list[int]:
    """The distinct ranks, at most ``max_rank``, that first keep each of ``energies`` (none
    for a constant output: every rank keeps all of it)."""
    ranks = {energy_rank(spectrum, e) for e in energies}
    return sorted(k for k in ranks if k <= max_rank and spectrum.energy(k) < 1.0)


class Truncation:
    """Forward hooks that replace one block's output at a time by its rank-``k``
    reconstruction; :meth:`set` picks the block (``None``: none, the model as it is).

    Args:
        model: the unwrapped model (block names are its module paths).
        blocks: the blocks that may be truncated.
        spectra: their output spectra (mean and principal directions).
    """

    def __init__(self, model: nn.Module, blocks: Sequence[Block], spectra: Mapping[str, Spectrum]) -> None:
        self.model = model
        self.blocks = {b.name: b for b in blocks}
        self.spectra = spectra
        self.active: tuple[Block, tuple[str, int]] | None = None
        # (block, rank) -> (U_k (m, k), mu (m,)), float32, on the device of the outputs
        self._factors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def set(self, name: str | None, rank: int = 0) -> None:
        """Truncates block ``name`` to ``rank`` from the next forward pass on."""
        if name is None:
            self.active = None
            return
        key = (name, rank)
        if key not in self._factors:
            spectrum = self.spectra[name]
            self._factors[key] = (spectrum.eigenvectors[:, :rank].float(), spectrum.mean.float())
        self.active = (self.blocks[name], key)

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        _, key = self.active
        u, mu = self._factors[key]
        if u.device != y.device:  # moved once, kept for every later batch
            u, mu = self._factors[key] = (u.to(y.device), mu.to(y.device))
        return mu + ((y - mu) @ u) @ u.T

    def __enter__(self) -> "Truncation":
        modules = dict(self.model.named_modules())
        for b in self.blocks.values():
            if b.kind == "linear":
                self._handles.append(modules[b.module].register_forward_hook(self._linear_hook(b.name)))
        for point in table_hooks(self.model, self.blocks.values()):
            hook = self._fields_hook({b.name for b in point.blocks}, list(point.features))
            self._handles.append(modules[point.module].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.active = None

    def _linear_hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self.active is None or self.active[0].name != name:
                return None
            return self._project(output)

        return hook

    def _fields_hook(self, names: set[str], feature_names: list[str]):
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
            if self.active is None or self.active[0].name not in names:
                return None
            kjt = args[0] if args else next(iter(kwargs.values()))
            keys = kjt.keys()
            lengths = kjt.lengths().view(len(keys), -1)
            if isinstance(output, KeyedTensor):  # a collection's own output: (B, D) per feature
                by_key = output.to_dict()
                for feature in self.active[0].features:
                    y, nonempty = by_key[feature], (lengths[keys.index(feature)] > 0).unsqueeze(1)
                    by_key[feature] = torch.where(nonempty, self._project(y), y)
                return KeyedTensor.from_tensor_list(output.keys(), [by_key[k] for k in output.keys()])
            fields = output[0] if isinstance(output, tuple) else output  # (B, F, D)
            fields = fields.clone()
            for feature in self.active[0].features:
                f = feature_names.index(feature)
                nonempty = (lengths[keys.index(feature)] > 0).unsqueeze(1)
                fields[:, f] = torch.where(nonempty, self._project(fields[:, f]), fields[:, f])
            if isinstance(output, tuple):
                # DeepFM's sparse arch: (fields, the deep tower's input = fields.flatten(1))
                if output[1].shape != fields.flatten(1).shape:
                    raise InputError(f"{type(module).__name__}: cannot truncate a table whose "
                                     "arch returns more than its fields")
                return (fields, fields.flatten(1))
            return fields

        return hook


def bernoulli_kl(base: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of the Bernoulli predictions ``p = sigmoid(base)`` and
    ``q = sigmoid(logits)``: the logloss of ``q`` against ``p`` less ``p``'s own.

    Args: base, logits: (B,). Returns: (B,), >= 0.
    """
    p = torch.sigmoid(base)
    return (p * (F.logsigmoid(base) - F.logsigmoid(logits))
            + (1 - p) * (F.logsigmoid(-base) - F.logsigmoid(-logits)))


def measure_sensitivity(
    model: nn.Module,
    blocks: Sequence[Block],
    spectra: Mapping[str, Spectrum],
    batches: Iterable[Any],
    config: SensitivityConfig = SensitivityConfig(),
    *,
    forward: nn.Module | None = None,
    progress: bool = False,
    feed: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> list[Probe]:
    """Truncates each block alone at the probed ranks and measures the loss it adds
    against the original's predictions (module docstring).

    One pass over ``batches``: each batch runs once as it is and once per probe. Under
    ``torch.distributed`` the loss sums are all-reduced (every rank must get as many
    batches, as :class:`~afmrec.pipeline.data.ParquetBatches` gives them).

    Args:
        model: the trained, uncompressed model (its block names are module paths);
            left unchanged.
        blocks: the blocks to probe.
        spectra: their output spectra (the same on every rank).
        batches: calibration batches (their labels are not used).
        config: the probed energies.
        forward: the module to run, if not ``model`` (a ``DistributedModelParallel``).
        progress: show a progress bar.
        feed: how one batch is run, ``feed(module, batch) -> logits`` (any shape: each
            entry a Bernoulli logit); default
            :func:`~afmrec.pipeline.evaluate.forward_logits`.
    Returns:
        One :class:`Probe` per block and probed rank.
    """
    from tqdm import tqdm

    from .evaluate import eval_mode, forward_logits, model_device

    runner = forward if forward is not None else model
    run = feed if feed is not None else forward_logits
    plan = [(b, k) for b in blocks
            for k in probe_ranks(spectra[b.name], config.energies, min(b.in_features, b.out_features))]
    device = model_device(model)
    sums = torch.zeros(len(plan) + 1, dtype=torch.float64, device=device)  # probes, rows

    with eval_mode(runner), torch.no_grad(), Truncation(model, blocks, spectra) as cut:
        for batch in tqdm(batches, desc="probes", disable=not progress, unit="batch"):
            cut.set(None)
            base = run(runner, batch).double()
            for j, (block, k) in enumerate(plan):
                cut.set(block.name, k)
                sums[j] += bernoulli_kl(base, run(runner, batch).double()).sum()
            sums[-1] += base.numel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    totals = sums.tolist()
    n = totals[-1]
    if n == 0:
        raise InputError("sensitivity probes: the calibration batches hold no sample")
    return [Probe(b.name, k, 1.0 - spectra[b.name].energy(k), totals[j] / n)
            for j, (b, k) in enumerate(plan)]


def sensitivity_weights(probes: Iterable[Probe], floor: float = SensitivityConfig.floor) -> dict[str, float]:
    """Loss increase per unit of dropped variance, by block (see the module docstring).

    Negative increases (none from :func:`measure_sensitivity`) count as 0; weights are floored at
    ``floor`` times the mean weight. Blocks without probes get no weight (1.0 in the
    greedy: their variance is all kept at any rank, so it never matters).
    """
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for p in probes:
        num[p.block] = num.get(p.block, 0.0) + p.dropped * max(p.delta_loss, 0.0)
        den[p.block] = den.get(p.block, 0.0) + p.dropped**2
    raw = {name: num[name] / den[name] for name in num if den[name] > 0}
    if not raw:
        return {}
    low = floor * sum(raw.values()) / len(raw)
    if low <= 0:
        return {}  # no measurable effect anywhere: fall back to variance alone
    return {name: max(w, low) for name, w in raw.items()}


def probes_to_records(probes: Iterable[Probe]) -> list[dict[str, Any]]:
    """Plain dicts (what the statistics file stores)."""
    return [asdict(p) for p in probes]


def probes_from_records(records: Iterable[Mapping[str, Any]]) -> list[Probe]:
    try:
        return [Probe(str(r["block"]), int(r["rank"]), float(r["dropped"]), float(r["delta_loss"]))
                for r in records]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"statistics: malformed sensitivity probes ({e})") from None
