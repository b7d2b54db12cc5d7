"""Shared fixtures: tiny models and hand-made batches (D=4, tables of 10-40 rows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import ModelConfig, TableSpec, build_model

TABLES = (TableSpec("t0", 10), TableSpec("t1", 40), TableSpec("t2", 25))

# A rank plan that counts parameters: fp32 tables served unpadded (4 bytes a parameter),
# table ranks of any size.
PARAMS = dict(table_format="fp32", serve_device="cpu", table_multiple=1)

WITHOUT_AFMREC = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "afmrec" or name.startswith("afmrec."):
            raise ImportError("afmrec is not installed here")
sys.meta_path.insert(0, Block())
import torch, torchrec
try:
    import afmrec
    sys.exit("afmrec was importable")
except ImportError:
    pass
"""


def run_without_afmrec(code: str, folder) -> list[str]:
    """Runs ``code`` in a fresh Python where ``import afmrec`` fails (a server with torch
    and TorchRec only), in ``folder`` (also its ``sys.argv[1]``); returns its output lines."""
    import subprocess
    import sys
    import textwrap

    out = subprocess.run([sys.executable, "-c", WITHOUT_AFMREC + textwrap.dedent(code), str(folder)],
                         capture_output=True, text=True, cwd=folder, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def tiny_config(arch: str, num_dense: int = 3, embedding_dim: int = 4) -> ModelConfig:
    return ModelConfig(
        arch,
        TABLES,
        num_dense=num_dense,
        embedding_dim=embedding_dim,
        dense_arch=(8, embedding_dim),
        over_arch=(16, 8, 1),
        deep_arch=(16, 8),
        dcn_num_layers=2,
        dcn_low_rank_dim=3,
    )


def random_batch(
    batch_size: int, num_dense: int, *, seed: int, max_bag: int = 3, tables=TABLES
) -> Batch:
    """Multi-hot bags of 0..max_bag ids (so some bags are empty), random dense and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for t in tables:
        n = torch.randint(0, max_bag + 1, (batch_size,), generator=g)
        lengths.append(n)
        values.append(torch.randint(0, t.num_embeddings, (int(n.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[t.name for t in tables], values=torch.cat(values), lengths=torch.cat(lengths)
    )
    dense = torch.randn(batch_size, num_dense, generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g).float()
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


@pytest.fixture(params=["dlrm", "dcn", "deepfm"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    torch.manual_seed(0)
    return build_model(tiny_config(arch))


@pytest.fixture(scope="session")
def reliability_run(tmp_path_factory):
    """The small finished run of the reliability tests (tests/reliability_run.py), made
    once for test_reliability.py and test_reliability_faults.py."""
    from .reliability_run import build_run

    return build_run(tmp_path_factory.mktemp("reliability"))


def with_table_ranks(ranks: dict[str, int], table_ranks: dict[str, int]) -> dict[str, int]:
    """``ranks`` with the tables' replaced: table name -> rank as ``table_ranks`` gives,
    tables absent from it left whole."""
    out = {n: k for n, k in ranks.items() if not n.startswith("sparse_arch.")}
    out.update({f"sparse_arch.embedding_bag_collection.{t}": k for t, k in table_ranks.items()})
    return out


def served_bytes(model: nn.Module, fmt: str, device: str) -> int:
    """Bytes of ``model`` as served: every table row in ``fmt`` (int8: a 4-byte scale and
    bias per row), padded to 16 bytes on CUDA; everything else fp32."""
    element, extra = {"fp32": (4, 0), "fp16": (2, 0), "int8": (1, 4)}[fmt]
    align = 16 if device == "cuda" else 1
    total, table_params = 0, 0
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            for bag in m.embedding_bags.values():
                rows, width = bag.weight.shape
                total += rows * (-(-(width * element + extra) // align) * align)
                table_params += bag.weight.numel()
    return total + 4 * (sum(p.numel() for p in model.parameters()) - table_params)
