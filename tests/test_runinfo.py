"""Throughput and peak-memory records of the stages (pipeline/runinfo.py), nothing mocked.

The unit tests feed a meter known batches. The 2-rank tests run train, stats, compress
and evaluate on 2 gloo ranks and the same stages through the CLI in one process, into
a folder laid out like ``bench/multigpu.sh``'s ``$OUT``, and then run that script's
final Python block on it: the CPU dry run of the GPU benchmark's report.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.compress import CompressConfig
from afmrec.pipeline.data import ParquetBatches
from afmrec.pipeline.model_io import load_record
from afmrec.pipeline.ranks import RankConfig
from afmrec.pipeline.report import read_report
from afmrec.pipeline.runinfo import RankRun, RunInfo, StageMeter, speedup
from afmrec.pipeline.stages import LOCAL, DataRef, load_statistics

from .conftest import random_batch
from .dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS, TEST_ROWS = 1000, 400
TRAIN_BATCH, STEPS, STATS_BATCH, EVAL_BATCH = 100, 3, 128, 128
MODEL = ["--embedding-dim", "8", "--over-arch", "16,1"]
RANK = RankConfig(policy="variance", ratio=2.0)
RECORD_KEYS = {"stage", "world_size", "device", "per_rank", "total_samples", "seconds",
               "total_samples_per_s"}
RANK_KEYS = {"rank", "samples", "seconds", "samples_per_s", "peak_memory_gib", "peak_rss_gib"}


def _check_totals(info: RunInfo) -> None:
    """The job's numbers follow from the per-rank ones, exactly."""
    samples = [r.samples for r in info.per_rank]
    seconds = [r.seconds for r in info.per_rank]
    assert info.to_dict()["total_samples"] == sum(samples)
    assert info.to_dict()["total_samples_per_s"] == sum(samples) / max(seconds)
    for r in info.per_rank:
        assert r.seconds > 0 and r.samples_per_s == r.samples / r.seconds


# --- unit ---------------------------------------------------------------------------


def test_meter_counts_rows_of_every_pass_and_gives_the_record():
    batches = [random_batch(n, 3, seed=n) for n in (5, 7, 11)]
    meter = StageMeter("stats", LOCAL)
    counted = meter.count(batches)
    assert len(counted) == 3 and not hasattr(counted, "set_epoch")  # the list's attributes
    with meter.timed():
        for _ in range(2):  # two epochs: counts add up
            assert [b.labels.numel() for b in counted] == [5, 7, 11]
    assert meter.samples == 46
    info = meter.gather()
    record = info.to_dict()
    assert set(record) == RECORD_KEYS and set(record["per_rank"][0]) == RANK_KEYS
    assert (info.stage, info.world_size, info.device) == ("stats", 1, "cpu")
    (rank,) = info.per_rank
    assert rank.rank == 0 and rank.samples == 46 and rank.seconds == meter.seconds > 0
    assert rank.peak_memory_gib is None and rank.peak_rss_gib > 0  # CPU: host RSS only
    assert record["total_samples_per_s"] == 46 / meter.seconds
    assert RunInfo.from_dict(record) == info
    assert RunInfo.from_json(info.report_columns()["throughput"]) == info
    json.dumps(record, allow_nan=False)  # plain JSON


def test_meter_without_samples_times_only():
    meter = StageMeter("compress", LOCAL)
    with meter.timed():
        pass
    with meter.timed():  # blocks add up
        pass
    info = meter.gather()
    assert info.total_samples is None and info.total_samples_per_s is None
    assert info.per_rank[0].samples_per_s is None and info.seconds == meter.seconds > 0


def test_summary_and_speedup_exact():
    two = RunInfo("stats", 2, "cuda", (RankRun(0, 810_240, 2.0, 405_120.0, 3.1, 5.0),
                                       RankRun(1, 814_450, 2.0, 407_225.0, 3.0, 5.0)))
    assert two.total_samples_per_s == 812_345.0 and two.peak_memory_gib == 3.1
    assert two.summary() == ("stats: 2 ranks, 812,345 samples/s total (rank 0 405,120, "
                             "rank 1 407,225), peak memory per rank 3.10, 3.00 GiB")
    one = RunInfo("stats", 1, "cuda", (RankRun(0, 812_345, 2.5, 324_938.0, 3.5, 5.0),))
    assert speedup(two, one) == 812_345.0 / (812_345 / 2.5)
    cpu = RunInfo("compress", 2, "cpu", (RankRun(0, None, 12.25, None, None, 1.0),
                                         RankRun(1, None, 12.1, None, None, 2.0)))
    assert cpu.summary("compress 2gpu") == ("compress 2gpu: 2 ranks, 12.25 s (rank 0 12.25, "
                                            "rank 1 12.10), peak RSS per rank 1.00, 2.00 GiB")
    alone = RunInfo("compress", 1, "cpu", (RankRun(0, None, 24.5, None, None, 1.0),))
    assert speedup(cpu, alone) == 24.5 / 12.25 and cpu.peak_memory_gib is None


# --- the stages on 2 gloo ranks and in one process --------------------------------------


def _two_ranks(env, out_dir: Path, run: Path) -> None:
    """``bench/multigpu.sh``'s N-rank stages: train, stats, compress, evaluate."""
    from afmrec.pipeline.stages import (compress_stage, evaluate_stage, model_config_from_schema,
                                        stats_stage, train_stage)
    from afmrec.pipeline.train import TrainConfig
    from afmrec.sharding.plan import ShardingConfig

    train, test = DataRef(run / "data" / "train"), DataRef(run / "data" / "test")
    common = {"env": env, "sharding": ShardingConfig({"*": "table_wise"})}
    config = model_config_from_schema(train.schema(), "dlrm", embedding_dim=8, over_arch=(16, 1))
    train_stage(run / "original", config, train, None, TrainConfig(max_steps=STEPS),
                batch_size=TRAIN_BATCH, progress=False, **common)
    stats_stage(run / "original", train, run / "stats.pt", batch_size=STATS_BATCH,
                progress=False, **common)
    compress_stage(run / "original", run / "stats.pt", run / "afm", RANK, CompressConfig(), **common)
    evaluate_stage({"original": run / "original", "afm": run / "afm"}, test,
                   run / "report_2gpu.parquet", batch_size=EVAL_BATCH, progress=False, **common)


def _cli(argv: list[str]) -> str:
    """Runs one command in this process; returns what it printed."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(argv) == 0
    return text.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The bench's ``$OUT`` (N = 2) on the CPU, and what the one-process commands printed."""
    run = tmp_path_factory.mktemp("runinfo")
    _cli(["synth", "--out", str(run / "data"), "--rows", str(TRAIN_ROWS), "--test-rows",
          str(TEST_ROWS), "--tables", "60,300,20,500", "--dense", "3", "--multi-hot", "2",
          "--quiet"])
    run_distributed(_two_ranks, 2, tmp_path_factory.mktemp("ranks"), run, timeout_s=300)
    data, cpu = str(run / "data" / "train"), ["--device", "cpu"]
    printed = {
        "train": _cli(["train", "--data", data, "--val-fraction", "0", "--max-steps", str(STEPS),
                       "--batch-size", str(TRAIN_BATCH), *MODEL, *cpu, "--out",
                       str(run / "original_1gpu")]),
        "stats": _cli(["stats", "--model", str(run / "original"), "--data", data, "--batch-size",
                       str(STATS_BATCH), *cpu, "--out", str(run / "stats_1gpu.pt")]),
        "compress": _cli(["compress", "--model", str(run / "original"), "--stats",
                          str(run / "stats.pt"), "--ratio", "2", "--policy", "variance", *cpu, "--out",
                          str(run / "afm_1gpu")]),
        "evaluate": _cli(["evaluate", "--data", str(run / "data" / "test"), "--batch-size",
                          str(EVAL_BATCH), "--quiet", *cpu, "--out",
                          str(run / "report_1gpu.parquet"), f"original={run / 'original'}",
                          f"afm={run / 'afm'}"]),
    }
    return run, printed


def test_stats_record_of_two_ranks_counts_every_row(run):
    out, _ = run
    info = RunInfo.from_dict(load_statistics(out / "stats.pt").meta["throughput"])
    assert (info.stage, info.world_size, info.device) == ("stats", 2, "cpu")
    assert [r.rank for r in info.per_rank] == [0, 1]
    assert [r.samples for r in info.per_rank] == [
        ParquetBatches(out / "data" / "train", STATS_BATCH, rank=r, world_size=2).num_rows
        for r in (0, 1)
    ]
    assert info.total_samples == TRAIN_ROWS
    _check_totals(info)
    assert all(r.peak_memory_gib is None and r.peak_rss_gib > 0 for r in info.per_rank)


def test_train_compress_evaluate_records_of_two_ranks(run):
    out, _ = run
    record = load_record(out / "original").provenance
    assert len(record["history"]) == 1  # kept beside the new record
    train = RunInfo.from_dict(record["throughput"])
    assert train.stage == "train" and [r.samples for r in train.per_rank] == [STEPS * TRAIN_BATCH] * 2
    _check_totals(train)
    compress = RunInfo.from_dict(load_record(out / "afm").provenance["throughput"])
    assert compress.world_size == 2 and compress.total_samples is None
    assert all(r.seconds > 0 and r.samples_per_s is None for r in compress.per_rank)
    rows = read_report(out / "report_2gpu.parquet")
    assert [r["variant"] for r in rows] == ["original", "afm"]
    for row in rows:
        info = RunInfo.from_json(row["throughput"])
        assert [r.samples for r in info.per_rank] == [TEST_ROWS // 2] * 2
        _check_totals(info)
        assert row["samples_per_s"] == info.total_samples_per_s
        assert row["peak_memory_gib"] is None  # no GPU: the column stays empty
    assert list(rows[0])[-6:] == ["ratio", "bytes_ratio", "delta_auc", "samples_per_s",
                                  "peak_memory_gib", "throughput"]


def test_one_process_records_and_printed_lines(run):
    out, printed = run
    train = RunInfo.from_dict(load_record(out / "original_1gpu").provenance["throughput"])
    assert train.world_size == 1 and train.total_samples == STEPS * TRAIN_BATCH
    stats = RunInfo.from_dict(load_statistics(out / "stats_1gpu.pt").meta["throughput"])
    assert stats.total_samples == TRAIN_ROWS
    number = r"[\d,]+"
    for name, info in (("train", train), ("stats", stats)):
        line = printed[name].splitlines()[-1]
        assert line == info.summary()
        assert re.fullmatch(rf"{name}: 1 rank, {number} samples/s total \(rank 0 {number}\), "
                            r"peak RSS per rank \d+\.\d\d GiB", line)
    assert re.fullmatch(r"compress: 1 rank, \d+\.\d\d s \(rank 0 \d+\.\d\d\), peak RSS per rank "
                        r"\d+\.\d\d GiB", printed["compress"].splitlines()[-1])
    assert "samples/s total" not in printed["evaluate"]  # --quiet: the table only
    assert "samples_per_s" in printed["evaluate"] and "throughput" not in printed["evaluate"]


def test_bench_report_block_dry_run(run):
    """The last Python block of bench/multigpu.sh, as the script runs it, on the CPU run."""
    out, _ = run
    script = (ROOT / "bench" / "multigpu.sh").read_text()
    block = re.findall(r"""python3 - "\$OUT" "\$N" <<'PY'\n(.*?)\nPY\n""", script, re.DOTALL)[-1]
    done = subprocess.run([sys.executable, "-", str(out), "2"], check=False, input=block, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    stages = ["train", "stats", "compress", "evaluate original", "evaluate afm"]
    assert [line.split(":")[0] for line in lines if line.startswith("SCALING")] == [
        f"SCALING {s}" for s in stages]
    summaries = [line for line in lines if line.startswith("STAGE")]
    assert [s.split(":")[0] for s in summaries] == [
        f"STAGE {s} {n}gpu" for s in stages for n in (2, 1)]
    assert all(" 2 ranks, " in s for s in summaries[::2]) and all(" 1 rank, " in s for s in summaries[1::2])
    assert all(re.search(r"\d\.\d\dx \(\d+% of linear\)$", s) for s in lines if s.startswith("SCALING"))


def test_resumed_stats_pass_counts_only_the_rows_it_ran(run, tmp_path):
    """Saves of the first 2 batches are planted as a killed pass would leave them; the
    resumed pass starts its reader at batch 3 and counts only the batches it ran."""
    from afmrec.pipeline import stages
    from afmrec.pipeline.artifacts import fingerprint
    from afmrec.pipeline.blocks import find_blocks
    from afmrec.pipeline.model_io import load_model, skeleton
    from afmrec.pipeline.stats import StatsCheckpoint, collect_statistics

    out_dir, _ = run
    model_dir, data, out = out_dir / "original_1gpu", DataRef(out_dir / "data" / "train"), tmp_path / "s.pt"
    blocks = find_blocks(skeleton(load_record(model_dir)))
    key = fingerprint([stages.model_fingerprint(model_dir), data.fingerprint(), STATS_BATCH, 1,
                       "float32", sorted(b.name for b in blocks)])
    model, _ = load_model(model_dir)
    collect_statistics(model, blocks, itertools.islice(data.batches(STATS_BATCH), 2),
                       checkpoint=StatsCheckpoint(tmp_path / ".s.pt.partial", 1, key))
    stats = stages.stats_stage(model_dir, data, out, batch_size=STATS_BATCH, progress=False,
                               checkpoint_every=100)
    assert stats.meta["resumed_from_batch"] == 2
    info = RunInfo.from_dict(stats.meta["throughput"])
    assert info.total_samples == TRAIN_ROWS - 2 * STATS_BATCH
    _check_totals(info)
