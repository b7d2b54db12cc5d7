"""submitit executors, and the env:// contract inside a submitit job.

A job runs on one of three executors: ``slurm`` (sbatch and srun, several nodes, one task
per GPU), ``local`` (subprocesses on this machine, with SLURM's time limit, signal and
requeueing: for a laptop and for tests) or ``debug`` (in this process, one task, in
order: for pdb). Every task of a job is one rank: :func:`export_env` turns submitit's
view of the job into the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``...) and the task then calls the same stage code as under
torchrun, which joins the process group with
:func:`~afmrec.sharding.env.init_distributed`. Jobs are never wrapped in torchrun.

Jobs are ``submitit.helpers.Checkpointable``: near the time limit, or when preempted,
SLURM (and the local executor) sends ``SIGUSR2``; rank 0 pickles the job again and
requeues it, and the rerun resumes from what the stages saved on disk.

Example::

    config = SlurmConfig(partition="gpu", nodes=2, gpus_per_node=8, time_min=120)
    outcomes = run_array(config, job, items)       # one job per item, results in order
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from afmrec.pipeline.errors import InputError
from afmrec.pipeline.hints import scalar_type

from .args import add_dataclass_options, dataclass_from_args

EXECUTORS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class SlurmConfig:
    """Where and how jobs run.

    Args:
        executor: ``"slurm"`` (needs ``srun``), ``"local"`` or ``"debug"`` (see module).
        folder: where submitit writes job scripts, pickles and logs, one sub-folder per
            job; on SLURM it must be visible from the compute nodes.
        partition, account, constraint, qos: SLURM's options of the same names.
        nodes: nodes per job (``local`` and ``debug``: 1).
        gpus_per_node: GPUs per node; the job runs one task (one rank) per GPU.
        tasks_per_node: ranks per node of a job without GPUs (gloo); default 1.
        cpus_per_task: CPUs of each task.
        mem_gb: memory per node.
        time_min: time limit of a job, in minutes.
        signal_delay_s: how long before the limit the job is signalled to save and
            requeue itself.
        max_requeues: how many time limits a job survives (preemptions do not count).
        array_parallelism: jobs of an array that run at once.
        setup: shell lines run before each job (``module load ...``,
            ``source .venv/bin/activate``).
        job_name: the SLURM job name.
    """

    executor: str = "slurm"
    folder: Path = Path("submitit")
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: float = 60.0
    signal_delay_s: int = 120
    max_requeues: int = 3
    array_parallelism: int = 64
    setup: tuple[str, ...] = ()
    job_name: str = "afmrec"

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(self, "setup", tuple(self.setup))
        if self.executor not in EXECUTORS:
            raise InputError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        if min(self.nodes, self.array_parallelism) < 1 or min(self.gpus_per_node, self.max_requeues) < 0:
            raise InputError("nodes and array_parallelism must be >= 1, gpus_per_node and "
                             "max_requeues >= 0")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise InputError(f"one task per GPU: tasks_per_node ({self.tasks_per_node}) must "
                             f"equal gpus_per_node ({self.gpus_per_node}) or be left out")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise InputError(f"tasks_per_node must be >= 1, got {self.tasks_per_node}")
        if self.executor != "slurm" and self.nodes != 1:
            raise InputError(f"the {self.executor} executor runs on one node, not {self.nodes}")
        if self.executor == "debug" and self.tasks != 1:
            raise InputError("the debug executor runs one task; use the local executor")
        if not 0 <= self.signal_delay_s < self.time_min * 60:
            raise InputError(f"signal_delay_s ({self.signal_delay_s}) must be shorter than "
                             f"the time limit ({self.time_min} min)")

    @property
    def tasks(self) -> int:
        """Tasks (ranks) per node."""
        return self.gpus_per_node or self.tasks_per_node or 1

    def describe(self) -> str:
        """One line for the user: executor, shape of a job, limit."""
        shape = f"{self.nodes} node(s) x {self.tasks} task(s)"
        if self.gpus_per_node:
            shape += " (one per GPU)"
        where = f", partition {self.partition}" if self.partition else ""
        return f"{self.executor}: {shape}{where}, {self.time_min:g} min, logs in {self.folder}"


_FIELDS = {f.name: f for f in dataclasses.fields(SlurmConfig)}


def _kind(name: str) -> type:
    """The type of a :class:`SlurmConfig` field: ``tuple``, or its scalar type."""
    hint = typing.get_type_hints(SlurmConfig)[name]
    return tuple if typing.get_origin(hint) is tuple else scalar_type(hint)


def _check_type(name: str, value: Any, where: str) -> Any:
    """A config file's value, checked against the field's type."""
    kind = _kind(name)
    if kind is tuple:  # setup: a list of shell lines
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind is Path:
        ok = isinstance(value, str)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise InputError(f"{where}: {name} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value  # TOML writes 240.0 as 240 too


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings of a TOML or JSON file, by :class:`SlurmConfig` field name.

    Keys may use ``-`` or ``_`` (``gpus-per-node`` or ``gpus_per_node``).

    Raises:
        InputError: the file is missing or unreadable, or has an unknown key or a value
            of the wrong type (the message names the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: SLURM config file not found")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a table of settings")
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise InputError(f"{path}: unknown setting {key!r} (known: {', '.join(_FIELDS)})")
        values[name] = _check_type(name, value, str(path))
    return values


# Where a flag's value is: _DEST + field name (``args.slurm_nodes`` for ``--nodes``).
_DEST = "slurm_"

# Flag help of every SlurmConfig field (the dataclass gives names, types and defaults).
SLURM_HELP = {
    "executor": "slurm (sbatch/srun), local (subprocesses here) or debug (in this process)",
    "folder": "folder of job scripts and logs, visible from the compute nodes",
    "partition": "SLURM partition",
    "account": "SLURM account to charge",
    "constraint": "SLURM node constraint (e.g. h100)",
    "qos": "SLURM quality of service",
    "nodes": "nodes per job",
    "gpus_per_node": "GPUs per node; one task (rank) per GPU",
    "tasks_per_node": "ranks per node of a CPU job (gloo)",
    "cpus_per_task": "CPUs per task",
    "mem_gb": "memory per node, GB",
    "time_min": "time limit of a job, minutes; the job saves and requeues itself near it",
    "signal_delay_s": "seconds before the limit at which the job is told to save and requeue",
    "max_requeues": "time limits a job survives (preemptions do not count)",
    "array_parallelism": "jobs of a batch running at once",
    "setup": "shell lines run before each job (e.g. 'source .venv/bin/activate')",
    "job_name": "SLURM job name",
}


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """``--slurm-config FILE`` and one flag per :class:`SlurmConfig` field.

    Flags left out keep the file's value, then the field's default.
    """
    g = parser.add_argument_group("job options (SLURM through submitit; flags override --slurm-config)")
    g.add_argument("--slurm-config", type=Path, metavar="FILE",
                   help="job options from a TOML or JSON file, keys as the flags below")
    # absent_unless_given: a flag that is not given leaves no attribute, so the file's
    # value stays.
    add_dataclass_options(parser, SlurmConfig, SLURM_HELP, dest_prefix=_DEST, group=g,
                          absent_unless_given=True,
                          extra={"executor": {"choices": EXECUTORS}, "setup": {"metavar": "LINE"}})


def slurm_config_from_args(args: argparse.Namespace) -> SlurmConfig:
    """The :class:`SlurmConfig` of ``--slurm-config`` and the flags (flags win)."""
    from_file = read_config_file(args.slurm_config) if args.slurm_config else {}
    return dataclass_from_args(SlurmConfig, args, dest_prefix=_DEST, fallback=from_file)


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if float(mem_gb).is_integer() else f"{int(mem_gb * 1024)}MB"


def slurm_parameters(config: SlurmConfig) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments (sbatch options) of ``config``."""
    params: dict[str, Any] = {
        "job_name": config.job_name,
        "time": max(1, math.ceil(config.time_min)),
        "nodes": config.nodes,
        "ntasks_per_node": config.tasks,
        "signal_delay_s": config.signal_delay_s,
        "array_parallelism": config.array_parallelism,
    }
    optional = {
        "partition": config.partition,
        "account": config.account,
        "constraint": config.constraint,
        "qos": config.qos,
        "cpus_per_task": config.cpus_per_task,
        "gpus_per_node": config.gpus_per_node or None,
        "mem": _mem(config.mem_gb) if config.mem_gb else None,
        "setup": list(config.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def make_executor(config: SlurmConfig) -> Any:
    """The submitit executor of ``config``, its parameters set."""
    import submitit

    folder = config.folder / "%j"
    if config.executor == "debug":
        return submitit.DebugExecutor(folder)
    if config.executor == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=config.max_requeues)
        executor.update_parameters(timeout_min=config.time_min, tasks_per_node=config.tasks,
                                   gpus_per_node=config.gpus_per_node,
                                   signal_delay_s=config.signal_delay_s,
                                   **({"setup": list(config.setup)} if config.setup else {}))
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=config.max_requeues)
    except RuntimeError as e:  # no srun: not on a SLURM cluster
        raise InputError(f"executor 'slurm': {e} (--executor local runs on this machine)") from None
    executor.update_parameters(**slurm_parameters(config))
    return executor


def export_env() -> None:
    """Sets this submitit task's env:// variables, as torchrun would.

    A job of one task stays a plain process (no process group), as a stage run without
    torchrun. ``CUDA_VISIBLE_DEVICES`` is left as SLURM set it:
    :func:`~afmrec.sharding.env.init_distributed` picks the GPU (``cuda:LOCAL_RANK``, or
    ``cuda:0`` where a task sees one GPU), the one place where a rank chooses its device.
    """
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@contextlib.contextmanager
def distributed_task(device: str = "auto", sharding: Sequence[str] = ("*=table_wise",)) -> Iterator[Any]:
    """Inside a submitit task: joins the job's process group for the duration.

    Yields:
        ``(env, sharding)`` as :func:`afmrec.launch.args.job` does for a CLI stage.
    """
    from .args import job

    export_env()
    # Not quiet: the job's log is where its progress is read (ranks > 0 stay quiet).
    with job(argparse.Namespace(device=device, sharding=list(sharding), quiet=False)) as pair:
        yield pair


class StageError(Exception):
    """Raised by a job whose stage stopped on bad input, with the stage's one-line error:
    the job fails (as SLURM accounts it), and :func:`outcome` reports that line."""


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job gave: rank 0's return value, or why it gave none.

    Attributes:
        result: rank 0's return value.
        error: one line: why the job did not finish, and where its log is.
        bad_input: whether it stopped on bad input (a :class:`StageError`).
    """

    result: Any = None
    error: str | None = None
    bad_input: bool = False


_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b")
# How a StageError ends the traceback text that submitit keeps of a failed job.
_STAGE_ERROR = re.compile(r"^(?:[\w.]+\.)?StageError: (.+)$")


def _failure(job: Any, error: BaseException) -> JobOutcome:
    """A job's failure in one line (the exception that ended it, or the stage's error)
    and where its log is."""
    log = f"(log: {job.paths.stderr})"
    if isinstance(error, StageError):  # raised in this process (the debug executor)
        return JobOutcome(error=f"job {job.job_id}: {error} {log}", bad_input=True)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    head = raised[-1] if raised else (lines[0] if lines else type(error).__name__)
    stage = _STAGE_ERROR.match(head)
    if stage:
        return JobOutcome(error=f"job {job.job_id}: {stage.group(1)} {log}", bad_input=True)
    return JobOutcome(error=f"job {job.job_id} did not finish: {head} {log}")


def outcome(job: Any) -> JobOutcome:
    """Waits for ``job`` and returns rank 0's result, or a one-line error."""
    from submitit.local.debug import DebugJob

    if isinstance(job, DebugJob):
        # Only results() runs a debug job inside its job environment (and opens pdb if it
        # raises: what the debug executor is for).
        try:
            return JobOutcome(result=job.results()[0])
        except Exception as e:
            return _failure(job, e)
    error = job.exception()  # never raises for a failed job, unlike results()
    if error is not None:
        return _failure(job, error)
    return JobOutcome(result=job.results()[0])


def submit_array(executor: Any, fn: Callable[..., Any], items: Sequence[Any]) -> list[Any]:
    """One job per item (``executor.map_array``); items should be paths, never models."""
    from submitit.helpers import clean_env

    # A batch started from inside a SLURM allocation or a torchrun job must not pass its
    # own SLURM_* / RANK variables on to the jobs.
    with clean_env():
        return executor.map_array(fn, items)


def run_array(
    config: SlurmConfig,
    fn: Callable[..., Any],
    items: Sequence[Any],
    on_submit: Callable[[list[Any]], None] | None = None,
) -> list[JobOutcome]:
    """Runs ``fn(item)`` as one job per item and waits for all of them.

    SLURM throttles an array itself (``array_parallelism``); the local executor would
    start every job at once, so it gets them in waves of ``array_parallelism``.

    Args:
        config: where and how.
        fn: the job (a ``Checkpointable`` to be requeued on preemption or timeout).
        items: one argument per job.
        on_submit: called with each list of submitted jobs (to print their ids).
    Returns:
        One :class:`JobOutcome` per item, in order.
    """
    executor = make_executor(config)
    wave = config.array_parallelism if config.executor == "local" else max(len(items), 1)
    outcomes = []
    for start in range(0, len(items), wave):
        jobs = submit_array(executor, fn, items[start : start + wave])
        if on_submit is not None:
            on_submit(jobs)
        outcomes += [outcome(job) for job in jobs]
    return outcomes
