"""The process group of a job, from the env:// contract shared by torchrun and SLURM.

Both ``torchrun`` and ``submitit.helpers.TorchDistributedEnvironment().export()`` set
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them and is the one place where a rank
picks its device. Without those variables the job is a single process: no process group
is created and every helper here degrades to its one-process meaning.

Example::

    env = init_distributed()
    try:
        ...  # build the model on env.device, shard it, train
        barrier()
    finally:
        destroy_distributed()
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from afmrec.common.errors import InputError

logger = logging.getLogger(__name__)

DEVICE_KINDS = ("auto", "cpu", "cuda")
_REQUIRED_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# The key-value store of the process group this process is in, under that group's prefix
# (see _group_store), for the ranks to agree on a failure (fail_job).
_JOB_STORE: Any = None
# Process groups this process has joined: each has keys of its own.
_GROUPS_JOINED = 0
# The key under which the first rank to fail records its error: "RANK\nMESSAGE".
_ERROR_KEY = "error"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank among the processes of this host.
        local_world_size: processes per host (TorchRec's table-row-wise sharding and
            placements group ranks by host with it).
        device: this rank's compute device.
        backend: ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        """Whether a default process group exists (false for a plain one-process run)."""
        return is_distributed()

    def device_of(self, rank: int) -> torch.device:
        """The device that ``rank`` computes on, by the rule of :func:`init_distributed`.

        Sharding plans name each shard's device; they must agree with the device every
        rank actually picked. Assumes hosts alike and ranks laid out host by host, as
        torchrun and SLURM's block distribution do.
        """
        if self.device.type != "cuda":
            return self.device
        return _cuda_device(rank % self.local_world_size)


def init_distributed(device_kind: str = "auto") -> DistEnv:
    """Joins the job's process group (if any) and picks this rank's device.

    Reads the env:// variables. When ``WORLD_SIZE`` is unset the process runs alone:
    no process group is created and rank 0 of a world of 1 is returned. Otherwise
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` must all be set, and
    the default process group is initialised with NCCL on CUDA, gloo on CPU (also for
    ``WORLD_SIZE=1``, as under ``torchrun --nproc-per-node 1``, so that sharded code
    paths run unchanged). Calling it again in an initialised process returns the
    environment without creating a second group.

    The CUDA device is ``cuda:{LOCAL_RANK}``, except when the process sees a single
    GPU: submitit's ``export()`` (by default) and some SLURM setups restrict each task
    to its own GPU through ``CUDA_VISIBLE_DEVICES``, and that GPU is then ``cuda:0``
    whatever the local rank.

    Args:
        device_kind: ``"cuda"``, ``"cpu"`` or ``"auto"`` (CUDA when available).
    Returns:
        The process's :class:`DistEnv`.
    Raises:
        InputError: an unknown ``device_kind``, an incomplete or inconsistent set of
            env:// variables, CUDA requested but unavailable, or more ranks on a host
            than visible GPUs.
    """
    if device_kind not in DEVICE_KINDS:
        raise InputError(f"device_kind must be one of {DEVICE_KINDS}, got {device_kind!r}")
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise InputError("device_kind='cuda' but torch sees no CUDA device")
    rank, world_size, local_rank, local_world_size = _read_env()
    device = _cuda_device(local_rank) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        # The device id lets NCCL bind its communicator eagerly; gloo takes none.
        extra = {"device_id": device} if use_cuda else {}
        store = _group_store(rank, world_size)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                **extra)
        logger.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, device)
    return DistEnv(rank, world_size, local_rank, device, backend, local_world_size)


def _group_store(rank: int, world_size: int) -> Any:
    """The store of a new process group: the env:// rendezvous's (torchrun's agent's, or
    one that rank 0 holds), under a prefix of its own for each group this process joins.

    env:// alone would use the same key names for every group: a process that joins a
    second group after destroying the first (stages run one after the other in one
    process) could read the first group's addresses, still in torchrun's store, and fail
    to connect. It also remembers the store (:data:`_JOB_STORE`) until the group is
    destroyed: the ranks agree through it on a failure (:func:`fail_job`).
    """
    global _JOB_STORE, _GROUPS_JOINED
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    _GROUPS_JOINED += 1
    _JOB_STORE = dist.PrefixStore(f"afmrec/{_GROUPS_JOINED}", store)
    return _JOB_STORE


def _read_env() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from the env:// variables."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, 1
    missing = [name for name in _REQUIRED_VARS if name not in os.environ]
    if missing:
        raise InputError(f"env:// contract incomplete: WORLD_SIZE is set but not {missing}")
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError as e:
        raise InputError(f"env:// variables must be integers: {e}") from None
    if not (
        0 <= rank < world_size
        and 0 <= local_rank < local_world_size <= world_size
        and world_size % local_world_size == 0
    ):
        raise InputError(
            f"inconsistent env:// variables: RANK={rank} WORLD_SIZE={world_size} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world_size}"
        )
    return rank, world_size, local_rank, local_world_size


def _cuda_device(local_rank: int) -> torch.device:
    """The one place where a rank chooses its GPU (see :func:`init_distributed`)."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise InputError(
            f"LOCAL_RANK={local_rank} but this process sees only {visible} GPUs "
            "(more ranks per host than GPUs?)"
        )
    return torch.device("cuda", local_rank)


def destroy_distributed() -> None:
    """Destroys the default process group, if any.

    Call it explicitly at the end of every distributed job (in a ``finally``): a
    process group left to the interpreter's exit handlers occasionally aborts the
    process ("terminate called without an active exception") after all work is done.
    """
    global _JOB_STORE
    if is_distributed():
        dist.destroy_process_group()
    _JOB_STORE = None  # (a store that this rank holds closes with its last reference)


# --- one failure, one message ------------------------------------------------------------


class JobFailure(InputError):
    """An input error that stopped every rank of a job.

    Attributes:
        report: whether this rank prints it: exactly one rank of the job does (the first
            to fail); the others stopped because of it, in a collective it left or at
            the same check, and exit quietly with the same status.
    """

    def __init__(self, message: str, report: bool) -> None:
        super().__init__(message)
        self.report = report


class _Unreachable:
    """What :func:`_store_op` gives when the store is gone (its holder has exited)."""


UNREACHABLE = _Unreachable()


def _store_op(op: Callable[[Any], Any]) -> Any:
    """``op(store)`` on the job's store; None without a store, :data:`UNREACHABLE` if the
    store is gone."""
    if _JOB_STORE is None:
        return None
    try:
        return op(_JOB_STORE)
    except Exception:  # (DistNetworkError, DistStoreError...): the store's holder has exited
        return UNREACHABLE


def fail_job(error: BaseException) -> BaseException:
    """What this rank raises for ``error`` as it leaves its part of the job, so that the
    job's ranks stop on one message, printed once.

    An :class:`InputError` is claimed in the job's store before this rank leaves any
    collective: the first rank's claim wins (:class:`JobFailure` to report on that rank,
    not on the others, whose claims come second). When this rank then exits, its
    connections close and a collective that another rank is blocked in fails there:
    that error (not an input error) is the consequence of the claim found in the store,
    a :class:`JobFailure` not to report. It is also one where the store is gone, as when
    rank 0 held it (env://, outside torchrun) and failed first: a rank whose collective
    failed because its peer left. An error that is neither is this rank's own, returned
    as it is (a bug keeps its traceback), as is every error outside a job of several
    ranks.
    """
    _, world = rank_world()
    if world < 2:
        return error
    rank = dist.get_rank()
    if isinstance(error, InputError):
        claim = f"{rank}\n{error}"
        first = _store_op(lambda store: store.compare_set(_ERROR_KEY, "", claim))
    else:  # claimed before the failing rank left its collectives: it is there by now
        first = _store_op(lambda store: store.get(_ERROR_KEY) if store.check([_ERROR_KEY]) else None)
    if first is UNREACHABLE:  # its holder, rank 0 outside torchrun, has exited
        if isinstance(error, InputError):
            return JobFailure(str(error), report=True)
        # The backend's error (gloo's, NCCL's) at a peer's departure: the peer reported.
        return JobFailure("another rank failed", report=False) if isinstance(error, RuntimeError) else error
    if first is None:
        return error
    first_rank, _, message = first.decode().partition("\n")
    return JobFailure(message, report=first_rank == str(rank))


# --- the process group as seen from anywhere (no DistEnv needed) ---------------------------


def is_distributed() -> bool:
    """Whether a default process group exists (false for a plain one-process run; true
    under ``torchrun --nproc-per-node 1``, a group of one)."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` in the default process group; ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_collective() -> bool:
    """Whether other ranks take part: a process group of more than one rank. Agreement
    between ranks (broadcasts, gathered errors) is then needed; with one rank it is not."""
    return rank_world()[1] > 1


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (always true without a process group)."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Waits for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (collective: every rank of the group calls it; the
    caller checks :func:`is_collective` or ``env.is_distributed`` first)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_on_any_rank(error: str | None) -> None:
    """Raises ``InputError`` on every rank if any rank has an ``error`` (the lowest
    rank's), so that no rank goes on into a collective that another one left.

    Collective among several ranks (an object all-gather); one rank raises its own.
    """
    _, world = rank_world()
    if world > 1:
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise InputError(error)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` of all ranks (``value`` itself without a process group).

    Collective whenever a process group exists, a group of one included.
    """
    if not is_distributed():
        return value
    # NCCL reduces only CUDA tensors (init_distributed has set this rank's device).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the system's choice): a
    MASTER_PORT for a job started here, which must not meet another run's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
