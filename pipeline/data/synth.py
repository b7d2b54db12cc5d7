"""Production-shaped synthetic CTR data, labelled by a hidden model so AUC is meaningful.

Shape: Criteo-like table cardinalities, power-law (Zipf) id frequencies with the hot ids
scattered over the id space, optional multi-hot bags with missing values, and dense
features shaped like log-transformed counts.

Labels: each table has hidden embeddings ``(num_embeddings, hidden_dim)`` and a
first-order weight per id, mean-pooled over a row's bag. The logit is the sum of three
terms, each scaled to a fixed standard deviation on a calibration sample: a linear term of
the dense features, the sum over field pairs of the dot products of their pooled hidden
vectors (the interaction a DLRM learns), and the pooled first-order weights; plus a bias
that sets the positive rate. A label is Bernoulli(sigmoid(logit)). The AUC of the true
logits (``oracle_auc`` in ``_dataset.json``) bounds what a model can reach: about 0.8.

Memory: the hidden model holds, per table row, ``hidden_dim + 1`` float32 weights and an
int64 popularity-rank-to-id permutation: 28 bytes with ``hidden_dim=4``, so 10^7-row tables
take 280 MB each. Rows are generated in chunks, and only their logits and labels (5 bytes
per row, for ``oracle_auc``) are kept.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from ..artifacts import atomic_dir
from ..errors import InputError
from ..evaluate import logits_auc
from .schema import DataSchema, SparseField, create_dataset, sparse_column

# The 26 table sizes of Criteo Kaggle (Display Advertising Challenge), as hashed by DLRM.
# fmt: off
CRITEO_KAGGLE_TABLE_SIZES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
# fmt: on
# The same spread, capped at 200k rows so that the default data trains on a laptop.
DEFAULT_TABLE_SIZES = tuple(min(n, 200_000) for n in CRITEO_KAGGLE_TABLE_SIZES)

# Standard deviations of the logit's dense, interaction and first-order terms. Their
# total (~1.3) puts the oracle AUC near 0.8 for positive rates around 0.25.
TERM_STDS = np.array([0.5, 1.0, 0.7])
_CALIBRATION_ROWS = 1 << 16
# Rows are generated in chunks of this size; it is part of what a seed means.
_CHUNK_ROWS = 1 << 18
# Independent random streams of one seed.
_MODEL, _CALIBRATION, _TRAIN, _TEST = range(4)


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    Args:
        num_rows: rows of the train split.
        num_dense: N, dense features (named I1..IN).
        table_sizes: rows of each table (sparse fields named C1..CF).
        zipf_exponent: id frequencies follow ``rank^-zipf_exponent``; 0 is uniform.
        hidden_dim: dimension of the hidden model's embeddings.
        multi_hot: largest bag of each table (sizes are uniform in 1..max); ``None`` makes
            every field one-hot. A table is multi-hot (a ``list<int64>`` column) if its
            largest bag exceeds 1 or ``missing_rate > 0``.
        missing_rate: probability that a row's bag is empty, in every table; needs
            ``multi_hot``.
        positive_rate: target fraction of label-1 rows.
        seed: everything generated is a function of the config, seed included.

    Example::

        config = SynthConfig(num_rows=10_000, table_sizes=(10, 1000), multi_hot=(1, 3))
    """

    num_rows: int = 200_000
    num_dense: int = 13
    table_sizes: tuple[int, ...] = DEFAULT_TABLE_SIZES
    zipf_exponent: float = 1.1
    hidden_dim: int = 4
    multi_hot: tuple[int, ...] | None = None
    missing_rate: float = 0.0
    positive_rate: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_sizes", tuple(self.table_sizes))
        if self.multi_hot is not None:
            object.__setattr__(self, "multi_hot", tuple(self.multi_hot))
        if self.num_rows <= 0 or self.num_dense < 0 or self.hidden_dim <= 0:
            raise InputError("num_rows and hidden_dim must be positive, num_dense >= 0")
        if not self.table_sizes or min(self.table_sizes) <= 0:
            raise InputError(f"table_sizes must be positive, got {self.table_sizes}")
        if self.multi_hot is not None and (
            len(self.multi_hot) != len(self.table_sizes) or min(self.multi_hot) < 1
        ):
            raise InputError(
                f"multi_hot must give a largest bag >= 1 for each of the "
                f"{len(self.table_sizes)} tables, got {self.multi_hot}"
            )
        if not 0.0 <= self.missing_rate < 1.0:
            raise InputError(f"missing_rate must be in [0, 1), got {self.missing_rate}")
        if self.missing_rate > 0 and self.multi_hot is None:
            raise InputError(
                "missing_rate needs multi-hot tables (empty bags): set multi_hot (--multi-hot)"
            )
        if not 0.0 < self.positive_rate < 1.0:
            raise InputError(f"positive_rate must be in (0, 1), got {self.positive_rate}")
        if self.zipf_exponent < 0 or self.seed < 0:
            raise InputError("zipf_exponent and seed must be >= 0")

    def max_bags(self) -> tuple[int, ...]:
        """Largest bag of each table."""
        return self.multi_hot or (1,) * len(self.table_sizes)

    def schema(self) -> DataSchema:
        return DataSchema(
            dense=tuple(f"I{j + 1}" for j in range(self.num_dense)),
            sparse=tuple(
                SparseField(f"C{t + 1}", size, multi_hot=bool(bag > 1 or self.missing_rate > 0))
                for t, (size, bag) in enumerate(zip(self.table_sizes, self.max_bags()))
            ),
        )


def synthesize(
    config: SynthConfig,
    out_dir: str | os.PathLike[str],
    *,
    test_rows: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes ``out_dir/train`` (``config.num_rows`` rows) and ``out_dir/test``.

    Both splits share the hidden model and are drawn from independent random streams. Each
    split's ``_dataset.json`` records the config and its ``oracle_auc``.

    Args:
        config: what to generate.
        out_dir: folder to create, atomically.
        test_rows: rows of the test split; 0 writes no test split.
        overwrite: replace an existing ``out_dir``.
        progress: show a progress bar (on a terminal).

    Returns:
        ``out_dir``.

    Example::

        synthesize(SynthConfig(num_rows=100_000), "data/synth", test_rows=10_000)
    """
    if test_rows < 0:
        raise InputError(f"test_rows must be >= 0, got {test_rows}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model = _HiddenModel(config)
        _write_split(model, tmp / "train", config.num_rows, _TRAIN, progress)
        if test_rows:
            _write_split(model, tmp / "test", test_rows, _TEST, progress)
    return out_dir


def _rng(config: SynthConfig, *stream: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, *stream])


class _HiddenModel:
    """The labelling model (see the module docstring), drawn and calibrated from a config."""

    def __init__(self, config: SynthConfig) -> None:
        self.config = config
        self.schema = config.schema()
        rng = _rng(config, _MODEL)
        # Popularity rank -> id: the hot ids are spread over the table, not its first rows.
        self.rank_to_id = [rng.permutation(n) for n in config.table_sizes]
        # Per id: hidden_dim embedding values, then the first-order weight.
        self.weights = [
            rng.standard_normal((n, config.hidden_dim + 1), dtype=np.float32)
            for n in config.table_sizes
        ]
        self.dense_weight = rng.standard_normal(config.num_dense)
        _, terms = self.sample(_rng(config, _CALIBRATION), _CALIBRATION_ROWS)
        std = terms.std(axis=1)
        self.scales = np.divide(TERM_STDS, std, out=np.zeros(3), where=std > 0)
        self.bias = bias_for_rate(self.scales @ terms, config.positive_rate)

    def sample(
        self, rng: np.random.Generator, num_rows: int
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Draws rows without labels: (feature columns, logit terms (3, B) before scaling)."""
        config = self.config
        dense = np.log1p(rng.exponential(size=(config.num_dense, num_rows))).astype(np.float32)
        columns: dict[str, Any] = dict(zip(self.schema.dense, dense))
        pooled_sum = np.zeros((num_rows, config.hidden_dim))
        squared_norms = np.zeros(num_rows)
        first_order = np.zeros(num_rows)
        for t, (field, max_bag) in enumerate(zip(self.schema.sparse, config.max_bags())):
            lengths = _bag_sizes(rng, num_rows, max_bag, config.missing_rate)
            ranks = zipf_ranks(
                rng, field.num_embeddings, int(lengths.sum()), config.zipf_exponent
            )
            ids = self.rank_to_id[t][ranks]
            pooled = _mean_pool(self.weights[t][ids], lengths)
            vectors = pooled[:, :-1]
            pooled_sum += vectors
            squared_norms += np.einsum("bd,bd->b", vectors, vectors)
            first_order += pooled[:, -1]
            columns[field.name] = sparse_column(ids, lengths, field.multi_hot)
        # sum over pairs i < j of <v_i, v_j> = (|sum v|^2 - sum |v|^2) / 2
        interaction = 0.5 * (np.einsum("bd,bd->b", pooled_sum, pooled_sum) - squared_norms)
        terms = np.stack([self.dense_weight @ dense, interaction, first_order])
        return columns, terms

    def logits(self, terms: np.ndarray) -> np.ndarray:
        return self.scales @ terms + self.bias


def _write_split(
    model: _HiddenModel, out_dir: Path, num_rows: int, stream: int, progress: bool
) -> None:
    config, label = model.config, model.schema.label
    logits, labels = [], []
    chunks = range(0, num_rows, _CHUNK_ROWS)
    with create_dataset(model.schema, out_dir) as writer:
        bar = tqdm(chunks, desc=out_dir.name, disable=None if progress else True)
        for chunk, start in enumerate(bar):
            rng = _rng(config, stream, chunk)
            size = min(_CHUNK_ROWS, num_rows - start)
            columns, terms = model.sample(rng, size)
            logit = model.logits(terms)
            outcome = (rng.random(size) < _sigmoid(logit)).astype(np.int8)
            writer.write(pa.table({label: outcome, **columns}), source="synth")
            logits.append(logit.astype(np.float32))  # half the memory of a split's logits
            labels.append(outcome)
        oracle_auc = logits_auc(torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(labels)))
        writer.info.update(synth=asdict(config), oracle_auc=oracle_auc)


def _bag_sizes(
    rng: np.random.Generator, num_rows: int, max_bag: int, missing_rate: float
) -> np.ndarray:
    lengths = rng.integers(1, max_bag, size=num_rows, endpoint=True)
    if missing_rate > 0:
        lengths[rng.random(num_rows) < missing_rate] = 0
    return lengths


def zipf_ranks(
    rng: np.random.Generator, num_ids: int, size: int, exponent: float
) -> np.ndarray:
    """Ranks in ``[0, num_ids)``, rank ``k`` with probability about ``(k + 1.5)^-exponent``.

    Inverse-CDF sampling of the continuous power law on ``[1, num_ids + 1)``, floored: O(1)
    memory per table, where an exact discrete Zipf would need a ``num_ids`` CDF.
    """
    u = rng.random(size)
    a = 1.0 - exponent
    if abs(a) < 1e-9:
        x = (num_ids + 1.0) ** u
    else:
        x = (1.0 + u * ((num_ids + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, num_ids - 1)




def _mean_pool(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, K) means of consecutive ``lengths[b]`` rows of ``rows`` (0 for an empty bag)."""
    if np.all(lengths == 1):  # the one-hot case: nothing to pool
        return rows.astype(np.float64)
    bag = np.repeat(np.arange(len(lengths)), lengths)
    sums = np.stack(
        [np.bincount(bag, weights=column, minlength=len(lengths)) for column in rows.T], axis=1
    )
    return sums / np.maximum(lengths, 1)[:, None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def bias_for_rate(logits: np.ndarray, rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(logits + b)) == rate``, by bisection (it is monotone)."""
    lo, hi = -50.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(logits + mid).mean() < rate else (lo, mid)
    return (lo + hi) / 2
