"""`afmrec bench speed --small` on CPU: every key of the record, sane values, a record that
says what it ran on, and AFM variants planned exactly as `afmrec compress` plans them."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

from afmrec.launch.cli import main
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.evaluate import count_parameters
from afmrec.pipeline.model_io import ModelRecord, skeleton
from afmrec.pipeline.ranks import RankConfig, select_ranks
from afmrec.pipeline.sensitivity import probes_from_records, sensitivity_weights
from afmrec.pipeline.benchmarks.speed.labels import PlantedLabels, fit_
from afmrec.pipeline.benchmarks.speed.shape import SEEDS, SpeedShape, make_batches
from afmrec.pipeline.benchmarks.speed.variants import calibrate, inference_model

pytestmark = pytest.mark.slow

KEYS = ("train_vs_torchrec", "stats_vs_forward", "compress_vs_io", "infer_afm4x_vs_original",
        "infer_afm8x_vs_original", "infer_int8_vs_original", "infer_afm4x_int8_vs_original",
        "infer_fp16_vs_original", "infer_afm4x_fp16_vs_original", "infer_afm4x_vs_stock_torchrec",
        "cpu_latency_afm4x_vs_original")
FIT_STEPS = 30
VARIANTS = ("original", "afm4x", "afm8x", "int8", "afm4x_int8", "fp16", "afm4x_fp16", "afm4x_dense2",
            "afm4x_dense4", "afm4x_int8_dense4")


def test_bench_speed_small_writes_every_ratio_and_its_provenance(tmp_path):
    out = tmp_path / "speed.json"
    environ = dict(os.environ)
    assert main(["bench", "speed", "--small", "--device", "cpu", "--steps", "2", "--fit-steps", str(FIT_STEPS),
                 "--table-cap", "5000", "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(record[key], float) and record[key] > 0, key
    assert record["device"] == "cpu" and record["shape"]["embedding_dim"] == 64
    # provenance: the code, the device, the versions, the settings every variant shared
    run = record["run"]
    assert len(run["git_commit"]) == 40 and isinstance(run["git_dirty"], bool) and run["git_commit_source"] == "git"
    assert run["device_name"] == "cpu"
    assert {"torch", "torchrec", "triton"} <= set(run["versions"]) and any("fbgemm" in k for k in run["versions"])
    assert record["precision"]["dense_dtype"] == "float32" and record["infer_batch"] == 4096
    assert record["rank_policy"] == "loss"
    # the statistics pass is defined once: the calibration's length is the timed pass's
    assert record["calibration"]["stats_batches"] == record["stats_batches"] == 6
    assert record["calibration"]["stats_rows"] == 6 * 1024 and record["calibration"]["probes"] > 0
    for name in VARIANTS:
        assert record[f"kernels_{name}"]["lookup"] == "fbgemm"  # a CPU runs neither Triton kernel
        assert record[f"artifact_kernels_{name}"] == {"lookup": "fbgemm", "cross": "plain"}
        assert record[f"infer_format_{name}"] == "torchscript"
    # the AFM variants reach their byte targets within the planner's tolerance (10%)
    for name, target, fmt in (("afm4x", 4, "fp32"), ("afm8x", 8, "fp32"), ("afm4x_int8", 4, "int8"),
                              ("afm4x_fp16", 4, "fp16")):
        plan = record[f"plan_{name}"]
        assert plan["policy"] == "loss" and plan["table_format"] == fmt and plan["serve_device"] == "cuda"
        assert target / 1.1 <= plan["ratio"] <= target * 1.1, (name, plan["ratio"])
    assert record["plan_original"]["policy"] is None
    # --dense-ratio: the byte plan keeps the Linears whole at this shape, a dense budget
    # shrinks them that many times (within the 10% a rank unit may overshoot)
    assert record["plan_afm4x"]["dense_ratio"] < 2
    for name, dense, fmt in (("afm4x_dense2", 2.0, "fp32"), ("afm4x_dense4", 4.0, "fp32"),
                             ("afm4x_int8_dense4", 4.0, "int8")):
        plan = record[f"plan_{name}"]
        assert plan["table_format"] == fmt
        assert plan["target_dense_ratio"] == dense and dense <= plan["dense_ratio"] <= 1.1 * dense, plan
        assert 4 / 1.1 <= plan["ratio"] <= 4 * 1.1 and record[f"infer_{name}_vs_original"] > 0
    # against stock TorchRec serving on a CPU is against the original's best (TorchScript)
    assert record["infer_afm4x_vs_stock_torchrec"] == record["infer_afm4x_vs_original"]
    # the one-rank job's variables are gone again: a later command in this process (a
    # test) must not take itself for a rank of it
    assert dict(os.environ) == environ
    # both precisions of the statistics pass were timed; the key is the default's
    assert record["stats_precision"] == "float32"  # `--precision auto` on a CPU
    assert record["stats_vs_forward"] == record["stats_vs_forward_float32"]
    assert record["stats_vs_forward_bfloat16"] > 0
    # the served model was trained on labels with a signal before it was calibrated, and
    # every served artifact's AUC measured on held-out labelled rows
    assert record["fit"]["fit_steps"] == FIT_STEPS and record["eval_rows"] == 4 * 4096
    assert 0.6 < record["auc_original"] < record["auc_oracle"], record["auc_original"]
    for name in VARIANTS:
        assert record[f"auc_{name}"] == record[f"auc_torchscript_{name}"]
        assert record[f"delta_auc_{name}"] == record[f"auc_{name}"] - record["auc_original"]
        assert abs(record[f"delta_auc_{name}"]) < 0.01, (name, record[f"delta_auc_{name}"])
    assert_planned_as_select_ranks_plans_them(record, table_cap=5000)


def test_bench_speed_stages_run_alone(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--small", "--device", "cpu", "--table-cap", "2000", "--fit-steps", "0",
                 "--stages", "cpu", "--json", str(out), "--quiet"]) == 0
    record = json.loads(out.read_text())
    assert record["stages"] == ["cpu"] and record["fit"] == {"fit_steps": 0}
    assert record["cpu_latency_afm4x_vs_original"] > 0
    assert not any(k in record for k in ("train_vs_torchrec", "stats_vs_forward", "compress_vs_io",
                                         "infer_afm4x_vs_original"))


def assert_planned_as_select_ranks_plans_them(record: dict, table_cap: int) -> None:
    """The record's ranks are `select_ranks`' under the loss policy, called here directly
    on the same calibration (statistics and probes of the same seeded model, trained on
    the same batches, and the same batches), with the probes' weights: the benchmark plans
    as `afmrec compress` does."""
    shape = dataclasses.replace(SpeedShape.small(), table_cap=table_cap, fit_steps=FIT_STEPS)
    config = ModelRecord(shape.model_config())
    device = torch.device("cpu")
    model = inference_model(shape, device)
    fit_(model, shape, PlantedLabels.draw(shape, device), device)
    calibration = calibrate(model, config, shape, device)
    recorded = calibration.stats.meta["sensitivity"]
    weights = sensitivity_weights(probes_from_records(recorded["probes"]), recorded["floor"])
    blocks = [b for b in find_blocks(skeleton(config)) if b.name in calibration.spectra]
    other = count_parameters(skeleton(config)) - sum(b.params for b in blocks)
    for name, ratio, fmt in (("afm8x", 8.0, "fp32"), ("afm4x_int8", 4.0, "int8")):
        plan = select_ranks(blocks, calibration.spectra, RankConfig(
            policy="loss", ratio=ratio, table_format=fmt, serve_device="cuda", linear_multiple=8, weights=weights),
            other_params=other)
        assert record[f"plan_{name}"]["ranks"] == dict(sorted(plan.ranks.items()))
        assert record[f"plan_{name}"]["ratio"] == plan.ratio
        # the loss policy, not a uniform cut: the tables' ranks differ
        table_ranks = {k: v for k, v in plan.ranks.items() if "embedding_bag_collection" in k}
        assert len(set(table_ranks.values())) > 1


def test_planted_labels_have_the_synthetic_datas_rate_and_a_ceiling():
    """The hidden model labels a quarter of the rows positive, the same seed draws the
    same labels, and its own logits rank them with the synthetic data's ceiling (about
    0.8: module docstring of afmrec.pipeline.data.synth)."""
    shape = dataclasses.replace(SpeedShape.small(), table_cap=5000)
    device = torch.device("cpu")
    labels = PlantedLabels.draw(shape, device)
    batches = make_batches(shape, 4096, 4, device, seed=SEEDS["eval"])
    first, again = (list(labels.label(batches, seed=1)) for _ in range(2))
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(first, again))
    positives = torch.cat([b.labels for b in first]).mean().item()
    assert abs(positives - 0.25) < 0.02, positives
    assert 0.75 < labels.oracle_auc(first) < 0.85


def test_unknown_variants_and_stages_are_refused(capsys):
    assert main(["bench", "speed", "--small", "--device", "cpu", "--stages", "inference",
                 "--variants", "afm4x,afm3x"]) == 2
    assert "unknown inference variants ['afm3x']" in capsys.readouterr().err
    assert main(["bench", "speed", "--small", "--device", "cpu", "--stages", "cpu,warp"]) == 2
    assert "unknown speed stages ['warp']" in capsys.readouterr().err
    assert main(["bench", "speed", "--small", "--device", "cpu", "--infer-batch", "0", "--fit-steps", "-1"]) == 2
    assert "speed shape: infer_batch=0, fit_steps=-1 (counts must be >= 1" in capsys.readouterr().err


def test_speed_flags_name_every_shape_field_and_variant():
    """Each shape flag sets the SpeedShape field of its name, and --variants' help lists
    every variant (it is written out so that --help imports no torch)."""
    import argparse

    from afmrec.launch import bench_speed
    from afmrec.pipeline.benchmarks.speed.variants import VARIANTS

    parser = argparse.ArgumentParser()
    bench_speed.add_arguments(parser)
    fields = {f.name for f in dataclasses.fields(SpeedShape)}
    args = parser.parse_args([f"--{name.replace('_', '-')}=7" for name in bench_speed.SHAPE_FLAGS])
    assert set(bench_speed.SHAPE_FLAGS) <= fields and all(getattr(args, n) == 7 for n in bench_speed.SHAPE_FLAGS)
    help_words = set(re.findall(r"\w+", next(a.help for a in parser._actions if a.dest == "variants")))
    assert set(VARIANTS) <= help_words, set(VARIANTS) - help_words


@pytest.mark.parametrize("tables, row_bytes", [("fp32", 64 * 4), ("int8", 64 + 4), ("fp16", 64 * 2)])
def test_lookup_bytes_count_each_ids_row_and_the_ids_and_offsets(tables, row_bytes):
    """The bytes the profile divides by the lookups' time: every id's row values (an int8
    row's scale and bias too, no padding) plus the ids and the bag offsets as int32."""
    from afmrec.pipeline.export import serving_module
    from afmrec.pipeline.benchmarks.speed.profile import breakdown, lookup_bytes
    from afmrec.pipeline.benchmarks.speed.shape import make_batches

    shape = dataclasses.replace(SpeedShape.small(), table_cap=2000)
    model = inference_model(shape, torch.device("cpu"))
    served = serving_module(model, [t.name for t in shape.model_config().tables], tables)
    batch = make_batches(shape, 32, 1, torch.device("cpu"), seed=9)[0]
    ids = batch.sparse_features.values().numel()
    assert lookup_bytes(served, batch) == ids * row_bytes + 4 * (ids + 26 * 32 + 1)
    # 2 ms of lookups reading 6.7 GB: 3.35 TB/s, the H100 SXM's peak, so no speed-up left
    out = breakdown({"_pooled_lookup_body_0": 2000.0, "nvjet_tst_128x64": 1000.0, "triton_poi_fused_mul_0": 500.0,
                     "_cross_update_kernel_0": 500.0}, int(6.7e9), "NVIDIA H100 80GB HBM3")
    assert out["ms_by_class"] == {"cross": 0.5, "elementwise": 0.5, "gemm": 1.0, "lookup": 2.0}
    assert out["device_ms"] == 4.0 and out["share_by_class"]["lookup"] == 0.5
    assert out["lookup_achieved_tb_s"] == pytest.approx(3.35) and out["lookup_floor_ms"] == pytest.approx(2.0)
    assert out["batch_speedup_if_lookups_at_peak"] == pytest.approx(1.0)


def test_the_training_baseline_is_torchrecs_pipeline_doing_our_trainers_steps():
    """The training stage's baseline, TorchRec's ``TrainPipelineSparseDist`` over the
    model wrapped in ``LossModel``, does exactly the work of our ``train_`` (one gloo rank,
    tables sharded by TorchRec's planner): from the same initialisation, the same five
    batches give bitwise the same weights, so the stage's ratio compares speed alone."""
    from afmrec.launch.bench_speed import one_rank_unless_launched
    from afmrec.models import build_model
    from afmrec.pipeline.benchmarks.speed.training import run_pipeline, torchrec_pipeline
    from afmrec.pipeline.train import TrainConfig, train_
    from afmrec.sharding.dmp import shard_model
    from afmrec.sharding.env import destroy_distributed, init_distributed
    from afmrec.sharding.plan import planner_plan

    from .conftest import random_batch, tiny_config

    def local(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        """Each entry's local tensor (a copy), its name without ``prefix``."""
        out = {}
        for name, value in state.items():
            if hasattr(value, "local_shards"):
                value = value.local_shards()[0].tensor
            out[name.removeprefix(prefix)] = value.detach().clone()
        return out

    config = tiny_config("dcn", embedding_dim=8)
    batches = [random_batch(64, 3, seed=s) for s in range(5)]
    with one_rank_unless_launched():
        env = init_distributed("cpu")
        try:
            torch.manual_seed(0)
            theirs_model, pipeline = torchrec_pipeline(ModelRecord(config), env, 64, TrainConfig())
            torch.manual_seed(0)
            model = build_model(config, env.device, sparse_device="meta")
            dmp = shard_model(model, env, plan=planner_plan(model, env, batch_size=64))
            start = local(dmp.state_dict())
            assert local(theirs_model.state_dict(), "model.").keys() == start.keys()
            assert run_pipeline(pipeline, batches) == 5
            train_(dmp, batches, TrainConfig(), progress=False)
            theirs, ours = local(theirs_model.state_dict(), "model."), local(dmp.state_dict())
        finally:
            destroy_distributed()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    assert all(not torch.equal(ours[n], start[n]) for n in ours if "weight" in n), "every weight trained"


def test_gpu_check_script_runs_the_cuda_tests_then_the_benchmark(tmp_path):
    """``bench/gpu_check.sh``, the one command of a GPU session, on the CPU: it runs
    tests/test_cuda.py (all skipped here), then ``bench speed`` with the options given,
    and leaves the log of each and the record in ``$OUT``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(root / "bench/gpu_check.sh"), "--small", "--device", "cpu",
                           "--stages", "train", "--steps", "2", "--table-cap", "2000", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "skipped" in (tmp_path / "test_cuda.log").read_text()
    record = json.loads((tmp_path / "speed.json").read_text())
    assert record["stages"] == ["train"] and record["train_vs_torchrec"] > 0
    assert (tmp_path / "profile_train_step.txt").stat().st_size > 0


def test_a_stated_commit_is_recorded_in_place_of_what_git_reads(monkeypatch):
    """A copy of the tree made for a remote machine may carry a stale ``.git``: the commit
    that ``AFMREC_GIT_COMMIT`` states wins, marked as stated ("+dirty" says dirty)."""
    from afmrec.pipeline.benchmarks.speed.record import COMMIT_VARIABLE, run_metadata

    read = run_metadata(torch.device("cpu"))
    assert read["git_commit_source"] == "git" and len(read["git_commit"]) == 40
    monkeypatch.setenv(COMMIT_VARIABLE, "0" * 40)
    stated = run_metadata(torch.device("cpu"))
    assert (stated["git_commit"], stated["git_dirty"], stated["git_commit_source"]) == ("0" * 40, None, "$AFMREC_GIT_COMMIT")
    monkeypatch.setenv(COMMIT_VARIABLE, "1" * 40 + "+dirty")
    assert (run_metadata(torch.device("cpu"))["git_commit"], run_metadata(torch.device("cpu"))["git_dirty"]) == ("1" * 40, True)
