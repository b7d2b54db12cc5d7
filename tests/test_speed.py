"""`afmrec bench speed --small` on CPU: every key of the record, sane values."""

from __future__ import annotations

import json
import os

import pytest

from afmrec.launch.cli import main

pytestmark = pytest.mark.slow

KEYS = ("train_vs_torchrec", "stats_vs_forward", "compress_vs_io", "infer_afm4x_vs_original",
        "infer_afm8x_vs_original", "infer_int8_vs_original", "infer_afm4x_int8_vs_original",
        "infer_fp16_vs_original", "infer_afm4x_fp16_vs_original",
        "cpu_latency_afm4x_vs_original")


def test_bench_speed_small_writes_every_ratio(tmp_path):
    out = tmp_path / "speed.json"
    environ = dict(os.environ)
    assert main(["bench", "speed", "--small", "--device", "cpu", "--steps", "2",
                 "--table-cap", "5000", "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["device"] == "cpu" and record["shape"]["embedding_dim"] == 64
    # the AFM variants really are 4x and 8x smaller (whole model), int8 counts as original
    # uniform plans of the small shape, within the bench's tolerance (0.5) of the target
    assert 4 / 1.5 <= record["params_original"] / record["params_afm4x"] <= 4 * 1.5
    assert 8 / 1.5 <= record["params_original"] / record["params_afm8x"] <= 8 * 1.5
    # the one-rank job's variables are gone again: a later command in this process (a
    # test) must not take itself for a rank of it
    assert dict(os.environ) == environ
    # both precisions of the statistics pass were timed; the key is the default's
    assert record["stats_precision"] == "float32"  # `--precision auto` on a CPU
    assert record["stats_vs_forward"] == record["stats_vs_forward_float32"]
    assert record["stats_vs_forward_bfloat16"] > 0


def test_bench_speed_stages_run_alone(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--small", "--device", "cpu", "--table-cap", "2000",
                 "--stages", "cpu", "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    assert record["stages"] == ["cpu"]
    assert record["cpu_latency_afm4x_vs_original"] > 0
    assert not any(k in record for k in ("train_vs_torchrec", "stats_vs_forward", "compress_vs_io",
                                         "infer_afm4x_vs_original"))
    assert main(["bench", "speed", "--small", "--device", "cpu", "--stages", "cpu,warp"]) == 2
    assert "unknown speed stages ['warp']" in capsys.readouterr().err


def test_bench_speed_times_the_variants_asked_for(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--small", "--device", "cpu", "--table-cap", "2000", "--stages", "inference",
                 "--variants", "afm8x", "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    assert record["infer_afm8x_vs_original"] > 0 and record["infer_original_samples_per_s"] > 0
    assert not any(k.startswith(("infer_afm4x", "infer_int8", "infer_fp16")) for k in record)
    assert main(["bench", "speed", "--small", "--device", "cpu", "--stages", "inference",
                 "--variants", "afm4x,afm3x"]) == 2
    assert "unknown inference variants ['afm3x']" in capsys.readouterr().err
