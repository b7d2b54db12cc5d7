"""Property-based tests of the mathematics (hypothesis): random shapes, ranks and data.

* Full rank is exact: a Linear folded with the full eigenbasis of its outputs is the same
  map, for any input; so is a table (pooled outputs of non-empty bags; empty bags stay 0).
* At rank k, the mean squared reconstruction error of a block's outputs (the folded block
  against the original, over the calibration rows) is the sum of the dropped eigenvalues.
* Moments merge associatively, and statistics merged from any split of the rows equal
  one pass over them.

Data come from a seeded generator (hypothesis picks the shapes, ranks, scales and seed);
example counts are small so that the file runs in seconds.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import LowRankEmbeddingBagCollection, LowRankLinear
from afmrec.pipeline.bases import pca
from afmrec.pipeline.stats import Moments, Statistics

EXAMPLES = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([1e-3, 1.0, 1e3])
offsets = st.sampled_from([0.0, 1.0, -50.0, 1e4])


def _linear(n: int, m: int, scale: float, g: torch.Generator) -> nn.Linear:
    lin = nn.Linear(n, m, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64) * scale)
        lin.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64) * scale)
    return lin


def _moments(y: torch.Tensor, precision: str = "float64") -> Moments:
    m = Moments.zeros(y.shape[1])
    m.update_(y, precision)
    return m


@EXAMPLES
@given(n=st.integers(1, 12), m=st.integers(1, 12), rows=st.integers(1, 40), scale=scales, seed=seeds)
def test_full_rank_linear_is_exact(n, m, rows, scale, seed):
    g = torch.Generator().manual_seed(seed)
    lin = _linear(n, m, scale, g)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        spectrum = pca(_moments(lin(x)))
        lowrank = LowRankLinear.from_linear(lin, spectrum.eigenvectors, spectrum.mean)
        fresh = torch.randn(7, n, generator=g, dtype=torch.float64) * 3  # not the calibration rows
        want, got = lin(fresh), lowrank(fresh)
    assert lowrank.rank == m
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * (1 + float(want.abs().max())))


@EXAMPLES
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    dim=st.integers(1, 8),
    batch=st.integers(1, 12),
    seed=seeds,
)
def test_full_rank_table_is_exact_and_empty_bags_stay_zero(sizes, dim, batch, seed):
    g = torch.Generator().manual_seed(seed)
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=v,
                                  feature_names=[f"f{i}"]) for i, v in enumerate(sizes)]
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    lengths = torch.randint(0, 4, (len(sizes), batch), generator=g)  # 0: an empty bag
    values = torch.cat([torch.randint(0, v, (int(lengths[i].sum()),), generator=g)
                        for i, v in enumerate(sizes)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(len(sizes))],
                                              values=values, lengths=lengths.reshape(-1))
    with torch.no_grad():
        pooled = ebc(kjt)
        components, centers = {}, {}
        for i, c in enumerate(configs):
            y = pooled[f"f{i}"].double()
            nonempty = lengths[i] > 0
            if not nonempty.any():
                continue
            spectrum = pca(_moments(y[nonempty]))
            components[c.name], centers[c.name] = spectrum.eigenvectors, spectrum.mean
        if not components:
            return
        lowrank = LowRankEmbeddingBagCollection.from_embedding_bag_collection(ebc, components, centers)
        got = lowrank(kjt)
    for i in range(len(sizes)):
        want = pooled[f"f{i}"]
        torch.testing.assert_close(got[f"f{i}"], want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))
        assert (got[f"f{i}"][lengths[i] == 0] == 0).all()


@EXAMPLES
@given(
    n=st.integers(1, 10),
    m=st.integers(1, 10),
    rows=st.integers(2, 50),
    rank=st.integers(1, 10),
    scale=scales,
    seed=seeds,
)
def test_reconstruction_error_is_the_sum_of_dropped_eigenvalues(n, m, rows, rank, scale, seed):
    k = min(rank, m)
    g = torch.Generator().manual_seed(seed)
    lin = _linear(n, m, scale, g)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = lin(x)
        spectrum = pca(_moments(y))
        folded = LowRankLinear.from_linear(lin, spectrum.eigenvectors[:, :k], spectrum.mean)
        mse = float(((folded(x) - y) ** 2).sum(1).mean())
    dropped = float(spectrum.eigenvalues[k:].sum())
    total = float(spectrum.eigenvalues.sum())
    assert abs(mse - dropped) <= 1e-9 * (1 + total), (mse, dropped, total)


def _split(y: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(y, sizes)) if sizes else [y]


@EXAMPLES
@given(
    m=st.integers(1, 8),
    sizes=st.lists(st.integers(0, 30), min_size=3, max_size=3),
    scale=scales,
    offset=offsets,
    seed=seeds,
)
def test_moments_merge_is_associative_and_equals_one_pass(m, sizes, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(sum(sizes), m, generator=g, dtype=torch.float64) * scale + offset
    a, b, c = (_moments(part) for part in _split(y, sizes))
    left, right, one = a.merge(b).merge(c), a.merge(b.merge(c)), _moments(y)
    tol = dict(rtol=1e-12, atol=1e-12 * (1 + (abs(offset) + scale) ** 2 * max(1, sum(sizes))))
    for l, r, o in zip(left.tensors(), right.tensors(), one.tensors()):
        torch.testing.assert_close(l, r, **tol)
        torch.testing.assert_close(l, o, **tol)


@EXAMPLES
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    offset=offsets,
    precision=st.sampled_from(["float64", "float32", "bfloat16"]),
    seed=seeds,
)
def test_statistics_merged_from_any_split_equal_one_pass(widths, sizes, offset, precision, seed):
    """As ranks, batches and jobs do: each part's statistics, merged, against one pass.
    float64: to 1e-12. float32 (the default; centred Gram): to float32 accuracy relative
    to the spread. bfloat16: the centred rows rounded to 8 bits, each side within
    (2e + e^2) |Yc|^T |Yc| of the truth (e ~ 2^-8, spread ~ 1), so covariances agree to 2e-2."""
    g = torch.Generator().manual_seed(seed)
    names = [f"block{i}" for i in range(len(widths))]
    ys = {n: torch.randn(sum(sizes), w, generator=g) + offset for n, w in zip(names, widths)}

    def stats(rows: dict[str, torch.Tensor]) -> Statistics:
        return Statistics({n: _moments(r, precision) for n, r in rows.items()})

    parts = [stats(dict(zip(names, chunks))) for chunks in zip(*(_split(ys[n], sizes) for n in names))]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    one = stats(ys)
    for n in names:
        mm, mo = merged.moments[n], one.moments[n]
        assert float(mm.n) == float(mo.n) == sum(sizes)
        if not sum(sizes):
            continue
        if precision == "float64":
            rtol, atol, cov_tol = 1e-12, 1e-12 * (1 + offset ** 2) * sum(sizes), 1e-6
        elif precision == "float32":  # float32 products of centred rows (spread ~1), float64 sums
            rtol, atol, cov_tol = 1e-6, 1e-4 * sum(sizes), 1e-3
        else:  # t's error times the centre (~offset) enters s and G; it cancels in the covariance
            rtol, atol, cov_tol = 1e-5, 2e-2 * sum(sizes) * (1 + abs(offset)), 2e-2
        torch.testing.assert_close(mm.s, mo.s, rtol=rtol, atol=atol)
        torch.testing.assert_close(mm.g, mo.g, rtol=rtol, atol=atol)
        torch.testing.assert_close(mm.covariance, mo.covariance, rtol=cov_tol, atol=cov_tol)
