"""submitit jobs on the local and debug executors (no cluster, nothing mocked): batch
manifests, statistics passes killed or preempted and resumed, multi-task jobs, SLURM
options."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from submitit.slurm.slurm import _make_sbatch_string

from afmrec.launch.cli import build_parser, main
from afmrec.launch.cmd_batch import RowJob, RowOptions
from afmrec.launch.slurm import (
    SlurmConfig, make_executor, outcome, slurm_config_from_args, slurm_parameters, submit_array,
)
from afmrec.pipeline.batch import read_manifest
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.stages import DataRef, evaluate_stage, load_statistics, stats_stage

pytestmark = pytest.mark.launch

MODEL = ["--embedding-dim", "8", "--over-arch", "16,1", "--deep-arch", "16", "--quiet"]
# Local jobs: a time limit far away (the tests signal the jobs themselves).
LOCAL = ["--executor", "local", "--time-min", "5", "--signal-delay-s", "30"]
# A statistics pass of 157 small batches, saved every 25 (a save is fsynced: slow on a busy
# disk), caught midway by tests that poll every 10 ms for the first save.
LONG_PASS = {"calibration": "data/train@0:0.25", "batch_size": "32", "rank": "4"}
EVERY = 25


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """20,000 synthetic rows and three tiny trained models: m0 (dlrm), m1 (deepfm), m2 (dcn)."""
    root = tmp_path_factory.mktemp("launch")
    assert main(["synth", "--out", str(root / "data"), "--rows", "20000", "--test-rows", "1000",
                 "--tables", "60,300,20,500", "--dense", "3", "--multi-hot", "2",
                 "--missing-rate", "0.2", "--quiet"]) == 0
    for i, arch in enumerate(["dlrm", "deepfm", "dcn"]):
        assert main(["train", "--data", str(root / "data" / "train@0:0.3"), "--epochs", "1",
                     "--batch-size", "256", "--arch", arch, "--out", str(root / f"m{i}"), *MODEL]) == 0
    return root


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _results(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in pq.read_table(path).to_pylist()}


def _task_pid(job) -> int:
    """The worker process under a local job's controller (whose pid is the job id)."""
    children = Path(f"/proc/{job.job_id}/task/{job.job_id}/children").read_text().split()
    return int(children[0])


def _wait_for_save(out: Path, timeout: float = 90.0) -> None:
    """Until the row's statistics pass has saved at least once."""
    deadline = time.monotonic() + timeout
    while not list((out / ".stats.pt.partial").glob("rank0-*.pt")):
        assert not (out / "stats.pt").exists(), "the pass ended before it could be interrupted"
        assert time.monotonic() < deadline, "the statistics pass never saved"
        time.sleep(0.01)


def _assert_same_statistics(a: Path, b: Path) -> None:
    sa, sb = load_statistics(a), load_statistics(b)
    assert sorted(sa.moments) == sorted(sb.moments)
    for name in sa.moments:
        for x, y in zip(sa.moments[name].tensors(), sb.moments[name].tensors()):
            assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """Statistics of the long pass, uninterrupted (in this process: the same code)."""
    out = root / "reference.pt"
    stats_stage(root / "m0", DataRef.parse(root / LONG_PASS["calibration"]), out,
                batch_size=int(LONG_PASS["batch_size"]), progress=False)
    return out


def test_manifest_of_three_checkpoints(root, capsys):
    manifest = _manifest(root / "three.csv", [
        {"checkpoint": "m0", "calibration": "data/train@0:0.3", "out": "three/dlrm", "ratio": "2",
         "eval": "data/test", "batch_size": "512"},
        {"checkpoint": "m1", "calibration": "data/train@0:0.3", "out": "three/deepfm", "rank": "4",
         "finetune": "data/train@0.3:0.45", "eval": "data/test", "batch_size": "512"},
        {"checkpoint": "m2", "calibration": "data/train@0:0.3", "out": "three/dcn", "ratio": "1.5",
         "batch_size": "512"},
    ])
    out = root / "three.parquet"
    argv = ["batch", "--manifest", str(manifest), "--out", str(out), "--folder", str(root / "jobs")]
    assert main([*argv, *LOCAL]) == 0
    rows = _results(out)
    assert sorted(rows) == ["dcn", "deepfm", "dlrm"]
    for row in rows.values():
        assert row["status"] == "ok" and row["error"] is None and not row["skipped"]
        assert row["ratio"] == pytest.approx(row["params_before"] / row["params_after"])
        assert row["wall_s"] > 0 and Path(row["model_dir"]).is_dir()
    # the greedy budget is never overspent; a fixed rank shrinks the model too
    # ratio targets count served bytes, within 10%, planned by the default policy
    for name, target in (("dlrm", 2.0), ("dcn", 1.5)):
        assert target / 1.1 <= rows[name]["bytes_ratio"] <= target * 1.1
        assert rows[name]["policy"] == "loss"
    assert rows["deepfm"]["ratio"] > 1 and rows["deepfm"]["policy"] == "rank"
    assert rows["deepfm"]["model_dir"].endswith("finetuned")
    assert rows["dcn"]["auc_before"] is None and rows["dcn"]["auc_after"] is None
    # AUC before compression is the original model's own
    original = evaluate_stage({"m0": root / "m0"}, DataRef(root / "data" / "test"), None, progress=False)
    assert rows["dlrm"]["auc_before"] == pytest.approx(original[0]["auc"])
    assert rows["dlrm"]["delta_auc"] == pytest.approx(rows["dlrm"]["auc_after"] - original[0]["auc"])

    # A rerun submits nothing: every row is taken from the runs before.
    capsys.readouterr()
    assert main([*argv, "--executor", "debug"]) == 0
    assert "3 of 3 rows finished earlier" in capsys.readouterr().out
    again = _results(out)
    assert all(r["skipped"] for r in again.values())
    assert {k: r["auc_after"] for k, r in again.items()} == {k: r["auc_after"] for k, r in rows.items()}


def test_missing_checkpoint_fails_alone(root, capsys):
    """A Parquet manifest on the debug executor: a bare DCP checkpoint with its architecture
    in a separate file, a model folder, and a checkpoint that does not exist."""
    (root / "arch.json").write_text(json.dumps(json.loads((root / "m0" / "model.json").read_text())["model"]))
    common = {"calibration": "data/train@0:0.3", "rank": 4, "batch_size": 1024}
    manifest = root / "missing.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"checkpoint": "m0", "model_config": None, "out": "missing/good", **common},
        {"checkpoint": "m0/checkpoint", "model_config": "arch.json", "out": "missing/bare", **common},
        {"checkpoint": "no_such_model", "model_config": None, "out": "missing/bad", **common},
    ]), manifest)
    out = root / "missing_results.parquet"
    assert main(["batch", "--manifest", str(manifest), "--out", str(out), "--executor", "debug",
                 "--folder", str(root / "jobs"), "--quiet"]) == 1
    rows = _results(out)
    assert rows["good"]["status"] == "ok" and (root / "missing" / "good" / "compressed").is_dir()
    assert rows["bare"]["status"] == "ok"
    assert rows["bare"]["params_after"] == rows["good"]["params_after"]
    missing = str(root / "no_such_model")
    assert rows["bad"]["status"] == "failed" and missing in rows["bad"]["error"]
    assert missing in capsys.readouterr().err


def test_killed_statistics_pass_resumes_identically(root, reference):
    """SIGKILL of the worker mid-pass, then a rerun: the saved sums plus the batches left
    equal the uninterrupted pass bit for bit."""
    manifest = _manifest(root / "killed.csv", [{"checkpoint": "m0", "out": "killed", **LONG_PASS}])
    executor = make_executor(SlurmConfig(executor="local", folder=root / "jobs", time_min=5,
                                         signal_delay_s=30))
    (job,) = submit_array(executor, RowJob(RowOptions(EVERY, "cpu")), read_manifest(manifest))
    _wait_for_save(root / "killed")
    os.kill(_task_pid(job), signal.SIGKILL)
    assert "did not finish" in outcome(job).error
    assert not (root / "killed" / "stats.pt").exists()

    assert main(["batch", "--manifest", str(manifest), "--out", str(root / "killed.parquet"),
                 "--folder", str(root / "jobs"), "--checkpoint-every", str(EVERY), "--quiet",
                 *LOCAL]) == 0
    stats = root / "killed" / "stats.pt"
    assert load_statistics(stats).meta["resumed_from_batch"] > 0
    assert load_statistics(reference).meta["resumed_from_batch"] == 0
    _assert_same_statistics(stats, reference)
    assert not (root / "killed" / ".stats.pt.partial").exists()


def test_saves_of_another_pass_are_ignored(root, reference):
    """A save left by a pass over other data (another key) neither resumes nor blocks this one."""
    out = root / "other_pass.pt"
    stale = root / ".other_pass.pt.partial" / "rank0-000000009999.pt"
    stale.parent.mkdir()
    torch.save({"key": "another pass", "batches": 9999, "moments": {}}, stale)
    stats = stats_stage(root / "m0", DataRef.parse(root / LONG_PASS["calibration"]), out,
                        batch_size=int(LONG_PASS["batch_size"]), progress=False,
                        checkpoint_every=EVERY)
    assert stats.meta["resumed_from_batch"] == 0
    _assert_same_statistics(out, reference)
    assert not stale.parent.exists()


def test_preempted_job_requeues_and_finishes(root, reference):
    """SLURM's preemption sequence (SIGTERM, which submitit ignores, then its USR2 signal,
    also what the local executor sends near ``timeout_min``): the job saves, requeues
    itself and finishes from where the statistics pass stopped."""
    manifest = _manifest(root / "preempted.csv", [{"checkpoint": "m0", "out": "preempted", **LONG_PASS}])
    executor = make_executor(SlurmConfig(executor="local", folder=root / "jobs", time_min=5,
                                         signal_delay_s=30))
    (job,) = submit_array(executor, RowJob(RowOptions(EVERY, "cpu")), read_manifest(manifest))
    _wait_for_save(root / "preempted")
    worker = _task_pid(job)
    os.kill(int(job.job_id), signal.SIGTERM)  # the controller passes it on to the worker
    os.kill(worker, signal.SIGUSR2)
    result = outcome(job)
    assert result.error is None and result.result["status"] == "ok"
    assert "Requeued job" in job.stderr() + job.stdout()
    stats = root / "preempted" / "stats.pt"
    assert load_statistics(stats).meta["resumed_from_batch"] > 0
    _assert_same_statistics(stats, reference)


def test_submit_runs_a_stage_on_two_ranks(root):
    """`afmrec submit` with two tasks: each exports env:// and runs the stats stage as a rank;
    together they give the statistics of one process."""
    data = DataRef.parse(root / "data" / "train@0:0.3")
    out = root / "two_ranks.pt"
    assert main(["submit", *LOCAL, "--tasks-per-node", "2", "--folder", str(root / "jobs"),
                 "--wait", "--", "stats", "--model", str(root / "m0"), "--data", str(data),
                 "--out", str(out), "--batch-size", "500", "--device", "cpu", "--quiet"]) == 0
    one = stats_stage(root / "m0", data, root / "one_rank.pt", batch_size=500, progress=False)
    two = load_statistics(out)
    assert two.meta["world_size"] == 2
    for name, m in one.moments.items():
        for a, b in zip(m.tensors(), two.moments[name].tensors()):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-6 * float(a.abs().max()))


def test_slurm_options_from_file_and_flags(tmp_path):
    config_file = tmp_path / "cluster.toml"
    config_file.write_text('partition = "gpu"\naccount = "ads"\nconstraint = "h100"\n'
                           'nodes = 2\ngpus-per-node = 8\ntime_min = 240\n'
                           'setup = ["source .venv/bin/activate"]\n')
    argv = ["submit", "--slurm-config", str(config_file), "--time-min", "120", "--", "stats"]
    config = slurm_config_from_args(build_parser(argv).parse_args(argv))
    assert (config.partition, config.nodes, config.tasks, config.time_min) == ("gpu", 2, 8, 120)
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path,
                                 **slurm_parameters(config))
    for flag in ("--partition=gpu", "--account=ads", "--constraint=h100", "--nodes=2",
                 "--gpus-per-node=8", "--ntasks-per-node=8", "--time=120", "--signal=USR2@120"):
        assert f"#SBATCH {flag}" in script
    assert "source .venv/bin/activate" in script

    (tmp_path / "bad.json").write_text(json.dumps({"gpus": 8}))
    with pytest.raises(InputError, match="unknown setting 'gpus'"):
        slurm_config_from_args(build_parser(argv).parse_args(
            ["submit", "--slurm-config", str(tmp_path / "bad.json"), "--", "stats"]))
    with pytest.raises(InputError, match="one node"):
        SlurmConfig(executor="local", nodes=2)
    with pytest.raises(InputError, match="one task per GPU"):
        SlurmConfig(gpus_per_node=8, tasks_per_node=4)
