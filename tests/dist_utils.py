"""Runs a test function in N spawned CPU processes joined by a gloo process group.

Each worker gets the env:// variables (as torchrun would set them), joins the group
with :func:`afmrec.sharding.env.init_distributed`, runs ``fn(env, out_dir, *args)``,
writes what ``fn`` returned (or its traceback) to ``out_dir/rank{r}.pt``, and then
destroys its group. The parent judges the run by those files, never by exit codes: a
worker that wrote its result and then hung or aborted while tearing down (gloo aborts
at interpreter exit about 2 runs in 85) still counts as a success, while a worker that
raised has its traceback re-raised here.

Example::

    def work(env, out_dir):
        return {"rank": env.rank}

    results = run_distributed(work, world_size=2, out_dir=tmp_path)
    assert [r["rank"] for r in results] == [0, 1]
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from afmrec.sharding.env import free_port

WorkerFn = Callable[..., Any]
# How long workers may take to exit once all wrote their results (or, after a failure,
# once one wrote an error: its peers may be stuck in a collective it never joined).
TEARDOWN_GRACE_S = 10.0
FAILURE_GRACE_S = 2.0


def _result_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"rank{rank}.pt"


def _error_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f"rank{rank}.error"


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: WorkerFn, args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # the workers share the CI machine's few cores
    from afmrec.sharding.env import destroy_distributed, init_distributed

    out = Path(out_dir)
    tmp = out / f"rank{rank}.tmp"
    try:
        env = init_distributed("cpu")
        torch.save(fn(env, out, *args), tmp)
        tmp.rename(_result_path(out, rank))  # atomic: the parent never reads half a file
    except BaseException:  # reported through a file, judged by the parent
        tmp.write_text(traceback.format_exc())
        tmp.rename(_error_path(out, rank))
    destroy_distributed()


def run_distributed(
    fn: WorkerFn,
    world_size: int,
    out_dir: str | os.PathLike[str],
    *args: Any,
    timeout_s: float = 120.0,
) -> list[Any]:
    """Runs ``fn(env, out_dir, *args)`` on ``world_size`` gloo ranks; returns each rank's value.

    Args:
        fn: a module-level (picklable) function of ``(DistEnv, Path, *args)``; its
            return value must be ``torch.save``-able.
        world_size: number of processes.
        out_dir: an existing directory the workers share (their results, and any files
            they write themselves).
        *args: extra picklable arguments for ``fn``.
        timeout_s: workers still running after this many seconds are killed.
    Returns:
        The values ``fn`` returned, by rank.
    Raises:
        AssertionError: a worker raised (its traceback is in the message), or did not
            write its result in time.
    """
    out = Path(out_dir)
    for rank in range(world_size):
        _result_path(out, rank).unlink(missing_ok=True)
        _error_path(out, rank).unlink(missing_ok=True)
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), str(out), fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    _wait(context.processes, out, timeout_s)
    errors = [
        f"rank {rank} failed:\n{_error_path(out, rank).read_text()}"
        for rank in range(world_size)
        if _error_path(out, rank).is_file()
    ]
    missing = [
        rank
        for rank in range(world_size)
        if not _result_path(out, rank).is_file() and not _error_path(out, rank).is_file()
    ]
    if missing:
        errors.append(f"ranks {missing} died or ran past {timeout_s:.0f} s without a result")
    if errors:
        raise AssertionError("\n".join(errors))
    return [torch.load(_result_path(out, rank), weights_only=False) for rank in range(world_size)]


def _wait(processes: list, out: Path, timeout_s: float) -> None:
    """Waits until every rank wrote a result or any rank wrote an error, then reaps them.

    Workers still alive after a grace period (a hang in teardown, or ranks stuck in a
    collective that a failed rank never joined) are killed.
    """
    ranks = range(len(processes))
    deadline = time.monotonic() + timeout_s
    failed = False
    while time.monotonic() < deadline and not failed:
        failed = any(_error_path(out, r).is_file() for r in ranks)
        if all(_result_path(out, r).is_file() or not processes[r].is_alive() for r in ranks):
            break
        time.sleep(0.05)
    grace = time.monotonic() + (FAILURE_GRACE_S if failed else TEARDOWN_GRACE_S)
    for p in processes:
        p.join(timeout=max(grace - time.monotonic(), 0.0))
        if p.is_alive():
            p.kill()
            p.join()
