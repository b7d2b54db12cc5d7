"""Options built from config dataclasses: the SLURM flags and the training options through
the real parser, the shared helpers of afmrec.launch.args, the typed cells of a batch
manifest, and the CLI's import of them without torch."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afmrec.launch.args import add_dataclass_options, dataclass_from_args
from afmrec.launch.cli import build_parser
from afmrec.launch.slurm import SLURM_HELP, SlurmConfig, slurm_config_from_args
from afmrec.launch.train_options import train_config
from afmrec.pipeline.batch import BatchRow, read_manifest
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.hints import scalar_type
from afmrec.pipeline.stages import DataRef
from afmrec.pipeline.train import TrainConfig

# Every SlurmConfig field as a flag, none at its default.
FULL_SLURM = [
    "--executor", "local", "--folder", "/scratch/jobs", "--partition", "gpu", "--account", "ads",
    "--constraint", "h100", "--qos", "high", "--nodes", "1", "--gpus-per-node", "0",
    "--tasks-per-node", "3", "--cpus-per-task", "6", "--mem-gb", "2.5", "--time-min", "7.5",
    "--signal-delay-s", "30", "--max-requeues", "0", "--array-parallelism", "5",
    "--setup", "module load cuda", "source .venv/bin/activate", "--job-name", "grid",
]
FULL_SLURM_CONFIG = {
    "executor": "local", "folder": Path("/scratch/jobs"), "partition": "gpu", "account": "ads",
    "constraint": "h100", "qos": "high", "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 3,
    "cpus_per_task": 6, "mem_gb": 2.5, "time_min": 7.5, "signal_delay_s": 30, "max_requeues": 0,
    "array_parallelism": 5, "setup": ("module load cuda", "source .venv/bin/activate"),
    "job_name": "grid",
}


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _assert_exact(got: dict, want: dict) -> None:
    """Equal values of equal types (``7.5 == 7`` or ``1 == True`` would hide a lost parse)."""
    assert got == want
    for name, value in want.items():
        assert type(got[name]) is type(value), (name, got[name])


def _sub_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser([command])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


@pytest.mark.parametrize("command,rest", [("submit", ["--", "stats"]),
                                          ("batch", ["--manifest", "m.csv", "--out", "r.parquet"])])
def test_every_slurm_flag_parses_to_its_field(command, rest):
    assert set(FULL_SLURM_CONFIG) == {f.name for f in dataclasses.fields(SlurmConfig)}
    argv = [command, *FULL_SLURM, *rest]
    args = build_parser(argv).parse_args(argv)
    assert args.slurm_setup == ["module load cuda", "source .venv/bin/activate"]
    _assert_exact(_fields(slurm_config_from_args(args)), FULL_SLURM_CONFIG)


def test_slurm_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path):
    config_file = tmp_path / "cluster.toml"
    config_file.write_text('partition = "gpu"\nnodes = 2\ngpus-per-node = 8\ntime_min = 240.0\nmem_gb = 64\n'
                           'setup = ["source .venv/bin/activate"]\n')
    argv = ["submit", "--slurm-config", str(config_file), "--time-min", "120", "--nodes", "1",
            "--", "stats"]
    args = build_parser(argv).parse_args(argv)
    # a flag not given sets no attribute: it cannot hide the file's value with its default
    assert not hasattr(args, "slurm_partition") and not hasattr(args, "slurm_gpus_per_node")
    # a float field written as a TOML integer (mem_gb = 64) is the float 64.0
    want = {**_fields(SlurmConfig()), "partition": "gpu", "nodes": 1, "gpus_per_node": 8,
            "time_min": 120.0, "mem_gb": 64.0, "setup": ("source .venv/bin/activate",)}
    _assert_exact(_fields(slurm_config_from_args(args)), want)

    argv = ["submit", "--", "stats"]
    _assert_exact(_fields(slurm_config_from_args(build_parser(argv).parse_args(argv))),
                  _fields(SlurmConfig()))


def test_slurm_flag_errors():
    argv = ["submit", "--executor", "local", "--nodes", "2", "--", "stats"]
    with pytest.raises(InputError, match="the local executor runs on one node, not 2"):
        slurm_config_from_args(build_parser(argv).parse_args(argv))
    for bad in (["--executor", "cloud"], ["--nodes", "two"], ["--mem-gb", "lots"]):
        argv = ["submit", *bad, "--", "stats"]
        with pytest.raises(SystemExit) as e:
            build_parser(argv).parse_args(argv)
        assert e.value.code == 2


def test_slurm_flags_help():
    parser = _sub_parser("submit")
    (group,) = [g for g in parser._action_groups if g.title.startswith("job options")]
    actions = {a.option_strings[0]: a for a in group._group_actions}
    flags = ["--slurm-config"] + ["--" + name.replace("_", "-") for name in SLURM_HELP]
    assert list(actions) == flags
    for name, text in SLURM_HELP.items():
        action = actions["--" + name.replace("_", "-")]
        default = getattr(SlurmConfig, name)
        shown = "" if default in (None, ()) else f" (default: {default})"
        assert (action.dest, action.default, action.help) == (f"slurm_{name}", argparse.SUPPRESS,
                                                              text + shown)
    assert actions["--executor"].choices == ("slurm", "local", "debug")
    assert actions["--executor"].metavar is None
    assert (actions["--setup"].nargs, actions["--setup"].metavar) == ("+", "LINE")
    assert actions["--gpus-per-node"].metavar == "GPUS_PER_NODE"
    assert actions["--time-min"].help.endswith("(default: 60.0)")
    assert actions["--partition"].help == "SLURM partition"
    text = parser.format_help()
    for usage in ("[--executor {slurm,local,debug}]", "[--setup LINE [LINE ...]]",
                  "[--mem-gb MEM_GB]", "[--slurm-config FILE]"):
        assert usage in " ".join(text.split())


def test_train_options_parse_to_exact_config():
    argv = ["finetune", "--model", "m", "--data", "d", "--out", "o", "--epochs", "3",
            "--max-steps", "90", "--dense-lr", "0.5", "--sparse-lr", "0.25",
            "--weight-decay", "1e-4",
            "--patience", "2", "--eval-every", "40", "--seed", "7", "--distill-temperature", "2",
            "--eval-at-start"]
    want = {**_fields(TrainConfig()), "epochs": 3, "max_steps": 90, "dense_lr": 0.5,
            "sparse_lr": 0.25, "weight_decay": 1e-4, "patience": 2, "eval_every": 40, "seed": 7,
            "distill_temperature": 2.0, "eval_at_start": True}
    _assert_exact(_fields(train_config(build_parser(argv).parse_args(argv))), want)
    # The command line's defaults (issue 23): early stopping on the validation rows, with
    # --epochs a maximum; without validation rows, no patience; finetune scores its start.
    argv = ["train", "--data", "d", "--out", "o", "--no-eval-at-start"]
    _assert_exact(_fields(train_config(build_parser(argv).parse_args(argv))),
                  {**_fields(TrainConfig()), "epochs": 20, "patience": 2})
    argv = ["train", "--data", "d", "--out", "o", "--val-fraction", "0"]
    _assert_exact(_fields(train_config(build_parser(argv).parse_args(argv))),
                  {**_fields(TrainConfig()), "epochs": 20, "patience": None})
    argv = ["finetune", "--model", "m", "--data", "d", "--out", "o", "--val", "v"]
    _assert_exact(_fields(train_config(build_parser(argv).parse_args(argv))),
                  {**_fields(TrainConfig()), "epochs": 20, "patience": 2, "eval_at_start": True})
    actions = {a.dest: a for a in _sub_parser("train")._actions}
    # a None default is not shown ("(default: None)" until the options had one implementation)
    assert actions["max_steps"].help == "stop after this many optimizer steps"
    assert actions["dense_lr"].help == "Adam learning rate of the dense layers (default: 0.001)"
    assert actions["eval_at_start"].option_strings == ["--eval-at-start", "--no-eval-at-start"]


@dataclass(frozen=True)
class _Options:
    count: int
    path: Path = Path("here")
    limit: Optional[float] = None
    mode: str = "fast"
    sizes: tuple[int, ...] = (1, 2)
    flag: bool = False
    hidden: int = 9

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


_HELPS = {"count": "how many", "path": "where", "limit": "at most", "mode": "how",
          "sizes": "sizes", "flag": "a flag"}


def _options_parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, _Options, _HELPS, extra={"mode": {"choices": ("fast", "slow")}},
                          **kwargs)
    return parser


def test_dataclass_options_with_a_dest_prefix():
    parser = _options_parser(dest_prefix="o_")
    args = parser.parse_args(["--count", "3", "--path", "a/b", "--limit", "0.5", "--mode", "slow",
                              "--sizes", "4", "5", "--flag"])
    assert {k: v for k, v in vars(args).items()} == {
        "o_count": 3, "o_path": Path("a/b"), "o_limit": 0.5, "o_mode": "slow", "o_sizes": [4, 5],
        "o_flag": True}
    got = dataclass_from_args(_Options, args, dest_prefix="o_", hidden=1)
    _assert_exact(_fields(got), {"count": 3, "path": Path("a/b"), "limit": 0.5, "mode": "slow",
                                 "sizes": [4, 5], "flag": True, "hidden": 1})
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "1", "--mode", "medium"])
    with pytest.raises(InputError, match="count must be >= 0"):
        dataclass_from_args(_Options, parser.parse_args(["--count", "-1"]), dest_prefix="o_")
    actions = {a.dest: a for a in parser._actions}
    assert actions["o_count"].help == "how many"  # no default: nothing shown
    assert actions["o_path"].help == "where (default: here)"
    assert actions["o_limit"].help == "at most"
    assert actions["o_sizes"].help == "sizes (default: (1, 2))"
    assert (actions["o_count"].metavar, actions["o_mode"].metavar) == ("COUNT", None)
    assert "o_hidden" not in actions


def test_dataclass_options_absent_unless_given_take_the_fallback():
    parser = _options_parser(absent_unless_given=True)
    args = parser.parse_args(["--limit", "2", "--no-flag"])
    assert vars(args) == {"limit": 2.0, "flag": False}
    got = dataclass_from_args(_Options, args, fallback={"count": 4, "limit": 8.0, "flag": True})
    _assert_exact(_fields(got), {**_fields(_Options(0)), "count": 4, "limit": 2.0, "flag": False})
    # without the option, without a fallback: the field's default
    args = parser.parse_args([])
    assert vars(args) == {}
    _assert_exact(_fields(dataclass_from_args(_Options, args, count=1)), _fields(_Options(1)))


def test_scalar_type():
    assert scalar_type(int | None) is int
    assert scalar_type(Optional[Path]) is Path
    assert scalar_type(None | str) is str
    assert scalar_type(float) is float
    assert scalar_type(DataRef) is DataRef
    assert scalar_type(tuple[str, ...]) == tuple[str, ...]
    assert scalar_type(int | str) == int | str


def test_manifest_cells_parse_to_their_field_types(tmp_path):
    columns = [f.name for f in dataclasses.fields(BatchRow)]
    csv_row = {"checkpoint": " ck ", "calibration": "data@0:0.5", "out": "out/a", "name": "first",
               "model_config": "cfg.json", "ratio": "", "energy": "", "rank": "8",
               "policy": "", "table_format": "fp16", "serve_device": "cpu", "probe": "val@0:0.5",
               "table_multiple": "2", "dense_ratio": "", "method": "svd", "activation": "relu",
               "finetune": "data@0.5:0.9", "finetune_epochs": "3", "finetune_batch_size": "256",
               "eval": "test", "batch_size": "512"}
    assert list(csv_row) == columns
    second = {**dict.fromkeys(columns, ""), "checkpoint": "ck2", "calibration": "data",
              "out": "out/b", "ratio": "2.5", "dense_ratio": "2"}
    path = tmp_path / "m.csv"
    path.write_text("\n".join(",".join(r[c] for c in columns) for r in
                              ({c: c for c in columns}, csv_row, second)) + "\n")
    base = tmp_path.resolve()
    first, row2 = read_manifest(path)
    _assert_exact(_fields(first), {
        "checkpoint": base / "ck", "calibration": DataRef(base / "data", 0.0, 0.5),
        "out": base / "out/a", "name": "first", "model_config": base / "cfg.json",
        "ratio": None, "energy": None, "rank": 8, "policy": None, "table_format": "fp16",
        "serve_device": "cpu", "probe": DataRef(base / "val", 0.0, 0.5), "table_multiple": 2, "dense_ratio": None,
        "method": "svd",
        "activation": "relu", "finetune": DataRef(base / "data", 0.5, 0.9), "finetune_epochs": 3,
        "finetune_batch_size": 256, "eval": DataRef(base / "test"), "batch_size": 512})
    _assert_exact(_fields(row2), {
        **_fields(BatchRow(base / "ck2", DataRef(base / "data"), base / "out/b", ratio=2.5, dense_ratio=2.0)),
        "name": "b", "ratio": 2.5, "dense_ratio": 2.0})
    assert row2.rank_config().dense_ratio == 2.0

    # Parquet cells come typed: an integral float is an int, an int is a float
    table = pa.table({"checkpoint": ["ck"], "calibration": ["data"], "out": ["o"],
                      "rank": [4.0], "energy": pa.array([None], pa.float64()),
                      "batch_size": pa.array([64], pa.int64()), "table_multiple": [8]})
    pq.write_table(table, tmp_path / "m.parquet")
    (row,) = read_manifest(tmp_path / "m.parquet")
    assert (row.rank, row.batch_size, row.table_multiple, row.energy) == (4, 64, 8, None)
    assert type(row.rank) is int
    pq.write_table(pa.table({"checkpoint": ["ck"], "calibration": ["data"], "out": ["o"],
                             "ratio": [2]}), tmp_path / "int_ratio.parquet")
    (row,) = read_manifest(tmp_path / "int_ratio.parquet")
    assert type(row.ratio) is float and row.ratio == 2.0
    pq.write_table(pa.table({"checkpoint": ["ck"], "calibration": ["data"], "out": ["o"],
                             "rank": [True]}), tmp_path / "bool.parquet")
    with pytest.raises(InputError, match="row 1, column 'rank': expected int, got True"):
        read_manifest(tmp_path / "bool.parquet")


@pytest.mark.parametrize("column,cell,message", [
    ("rank", "4.5", "column 'rank': expected int, got '4.5'"),
    ("ratio", "two", "column 'ratio': expected float, got 'two'"),
    ("calibration", "data@x", "column 'calibration': data@x: expected DIR or DIR@START:STOP"),
])
def test_manifest_cell_of_the_wrong_type(tmp_path, column, cell, message):
    row = {"checkpoint": "ck", "calibration": "data", "out": "o", "ratio": "", "rank": "4",
           column: cell}
    if column == "ratio":
        row["rank"] = ""
    path = tmp_path / "m.csv"
    path.write_text(",".join(row) + "\n" + ",".join(row.values()) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}, row 1, {message}")):
        read_manifest(path)


def test_the_cli_options_import_no_torch():
    code = ("import sys\n"
            "import afmrec.launch.args, afmrec.pipeline.hints\n"
            "assert 'torch' not in sys.modules, 'args'\n"
            "import afmrec.launch.slurm\n"
            "from afmrec.launch.cli import build_parser\n"
            "for command in ('submit', 'batch'):\n"
            "    build_parser([command]).format_help()\n"
            "assert 'torch' not in sys.modules, 'slurm'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
