"""The quality benchmark's reduced grid (`afmrec bench quality --small`), end to end.

Frappe's terms forbid redistribution, so the test writes Frappe-shaped libFM files of its
own (the published id ranges, labels from a hidden rule); the synthetic part is generated.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.data import FRAPPE_FIELDS
from afmrec.pipeline.benchmarks.quality import COLUMNS, COMPRESSED, UNCOMPRESSED, check_targets, paired_summary


def write_frappe_like(folder, rows: dict[str, int], seed: int = 0) -> None:
    """frappe.{validation,test}.libfm: one id per field, CRLF lines, labels -1/1 from a
    hidden score over user, item and daytime (so a model has something to learn)."""
    rng = np.random.default_rng(seed)
    weights = {name: rng.normal(size=last - first + 1) for name, first, last in FRAPPE_FIELDS}
    folder.mkdir()
    for split, n in rows.items():
        lines = []
        for _ in range(n):
            ids = {name: int(rng.integers(0, last - first + 1)) for name, first, last in FRAPPE_FIELDS}
            score = sum(weights[f][ids[f]] for f in ("user", "item", "daytime"))
            label = 1 if rng.random() < 1 / (1 + np.exp(-2 * score)) else -1
            tokens = " ".join(f"{first + ids[name]}:1" for name, first, _ in FRAPPE_FIELDS)
            lines.append(f"{label} {tokens}\r\n")
        (folder / f"frappe.{split}.libfm").write_text("".join(lines))


@pytest.mark.slow
def test_small_grid_schema_and_full_rank_equals_original(tmp_path):
    data = tmp_path / "frappe"
    write_frappe_like(data, {"validation": 4_000, "test": 2_000})
    out = tmp_path / "bench" / "quality.parquet"
    assert main(["bench", "quality", "--small", "--quiet", "--data", str(data), "--data", "synth",
                 "--out", str(out), "--work", str(tmp_path / "work")]) == 0

    table = pq.read_table(out)
    assert set(COLUMNS) <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["dataset"] for r in rows} == {"frappe", "synth"}
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and r["bytes"] > 0 and r["wall_s"] >= 0
    frappe = {(r["model"], r["variant"], r["rank_selection"]) for r in rows if r["dataset"] == "frappe"}
    models = {m for m, _, _ in frappe}
    for m in models:
        assert {(m, v, "none") for v in UNCOMPRESSED} <= frappe
        assert {(m, v, "loss") for v in COMPRESSED} <= frappe
        assert {(m, "afm", s) for s in ("variance", "uniform", "full")} <= frappe

    # AFM at full rank is the original model: the same test AUC (to float32 rounding of the
    # logits, which can swap the order of a few near-tied rows: 1e-6 of AUC).
    originals = {(r["dataset"], r["model"], r["seed"]): r for r in rows if r["variant"] == "original"}
    full = [r for r in rows if r["rank_selection"] == "full"]
    assert len(full) == len(originals)
    for r in full:
        ref = originals[(r["dataset"], r["model"], r["seed"])]
        assert r["auc"] == pytest.approx(ref["auc"], abs=5e-6)
        assert r["logloss"] == pytest.approx(ref["logloss"], abs=1e-5)

    # compressed rows land within 10% of the target bytes ratio; int8 tables shrink the bytes
    for r in rows:
        if r["rank_selection"] in ("loss", "variance", "uniform"):
            assert r["target_ratio"] / 1.1 <= r["bytes_ratio"] <= 1.1 * r["target_ratio"], r
        if r["variant"] == "int8":
            assert r["bytes_ratio"] > 1.0 and r["ratio"] == 1.0 and r["table_format"] == "int8"

    summary = paired_summary(rows)
    assert all(s["delta_auc"] == 0.0 for s in summary if s["variant"] == "original")
    # the small grid runs 4x only: the 4x target of each of the three models
    assert len(check_targets(rows, "frappe", (4.0,))) == 3
    assert (out.parent / "spectrum_deepfm.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_shifted_activation_starts_as_the_exact_factorisation(arch):
    """After shift_activations_ on the calibration batches, the ReLU model's logits on
    those batches equal the model compressed without an activation."""
    import copy

    import torch

    from afmrec.models import build_model
    from afmrec.pipeline.bases import afm_bases, spectra
    from afmrec.pipeline.blocks import find_blocks
    from afmrec.pipeline.compress import CompressConfig, compress_
    from afmrec.pipeline.evaluate import predict_logits
    from afmrec.pipeline.benchmarks.quality import shift_activations_
    from afmrec.pipeline.stats import collect_statistics

    from .conftest import random_batch, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(arch, embedding_dim=6)).eval()
    batches = [random_batch(64, 3, seed=s) for s in range(3)]
    blocks = find_blocks(model)
    spec = spectra(collect_statistics(model, blocks, batches))
    bases = afm_bases(spec, {b.name: 2 for b in blocks if b.kind == "linear" and b.out_features > 2})
    exact = compress_(copy.deepcopy(model), bases)
    relu = compress_(copy.deepcopy(model), bases, CompressConfig(activation="relu"))
    assert not torch.allclose(predict_logits(relu, batches), predict_logits(exact, batches), atol=1e-4)
    shift_activations_(relu, batches)
    torch.testing.assert_close(predict_logits(relu, batches), predict_logits(exact, batches),
                               atol=1e-5, rtol=1e-5)
