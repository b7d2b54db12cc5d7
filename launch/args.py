"""Arguments shared by several sub-commands, so each is declared once."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from afmrec.pipeline.hints import scalar_type


class CurrentStderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when a record is emitted, not as it
    was when the handler was made: a caller that replaces ``sys.stderr`` (a test harness, a
    job wrapper) gets the logs, and a closed earlier stream is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool = False) -> None:
    """Plain one-line logs of ``afmrec.*``; third-party info logs (FBGEMM announces every
    library it loads on the root logger) and warnings that are noise to a user are off."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ours = logging.getLogger("afmrec")
    ours.setLevel(logging.WARNING if quiet else logging.INFO)
    if not ours.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.propagate = False
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help=f"where to write {what}")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (never an input)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")


def add_data(parser: argparse.ArgumentParser, flag: str = "--data", what: str = "data", required: bool = True) -> None:
    parser.add_argument(
        flag,
        required=required,
        metavar="DIR[@START:STOP]",
        help=f"{what}: a Parquet dataset folder (from `afmrec synth` or `afmrec convert`); "
        "append @0.9:1 to use only that fraction of its rows",
    )


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    helps: Mapping[str, str],
    *,
    dest_prefix: str = "",
    group: Any = None,
    absent_unless_given: bool = False,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One ``--field-name`` option per field of a config dataclass named in ``helps``.

    The dataclass stays the single source of names, types and defaults; read the options
    back with :func:`dataclass_from_args`. A field ``X | None`` takes an ``X``, a
    ``bool`` one is ``--name/--no-name``, a ``tuple[X, ...]`` one takes one or more ``X``
    (a list: the dataclass may make it a tuple).

    Args:
        parser: the (sub-)command's parser.
        cls: the dataclass.
        helps: the help of each field that gets an option, by field name; the help
            ends with the field's default unless that is ``None`` or empty.
        dest_prefix: the options' attributes are ``dest_prefix + field name`` (the flags
            are not prefixed): keeps the fields of two dataclasses apart.
        group: the argument group to add them to (default: a new one, "CLS options").
        absent_unless_given: an option that is not given sets no attribute
            (``argparse.SUPPRESS``), so that :func:`dataclass_from_args` takes the field
            from its ``fallback`` (a config file), or its default.
        extra: more :meth:`~argparse.ArgumentParser.add_argument` arguments of a field
            (``choices``, ``metavar``...), by field name.
    """
    hints = typing.get_type_hints(cls)
    if group is None:
        group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        tp = scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        more = (extra or {}).get(f.name, {})
        kwargs: dict[str, Any] = {
            "dest": dest_prefix + f.name,
            "default": argparse.SUPPRESS if absent_unless_given else default,
        }
        if tp is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, help=helps[f.name])
        else:
            if typing.get_origin(tp) is tuple:
                kwargs.update(nargs="+", type=typing.get_args(tp)[0])
            else:
                kwargs["type"] = tp
            shown = f" (default: {default})" if default not in (None, ()) else ""
            kwargs["help"] = helps[f.name] + shown
            if "choices" not in more:  # choices show themselves
                kwargs["metavar"] = f.name.upper()
        group.add_argument(flag, **{**kwargs, **more})


def dataclass_from_args(
    cls: type,
    args: argparse.Namespace,
    *,
    dest_prefix: str = "",
    fallback: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """The ``cls`` of the options :func:`add_dataclass_options` added to ``args``.

    A field's value is ``extra``'s, else its option's (attribute ``dest_prefix + name``),
    else ``fallback``'s, else the field's default.

    Raises:
        InputError: ``cls`` refuses the values (its validation raised a ``ValueError``).
    """
    kwargs = dict(fallback or {})
    kwargs.update({
        f.name: getattr(args, dest_prefix + f.name)
        for f in dataclasses.fields(cls)
        if hasattr(args, dest_prefix + f.name)
    })
    kwargs.update(extra)
    try:
        return cls(**kwargs)
    except ValueError as e:  # config validation: a bad option value
        from afmrec.pipeline.errors import InputError

        raise InputError(str(e)) from None


def int_list(text: str) -> tuple[int, ...]:
    """``"256,128"`` -> ``(256, 128)``."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_distributed(parser: argparse.ArgumentParser) -> None:
    """Options of the stages that run sharded under torchrun or SLURM."""
    g = parser.add_argument_group(
        "distributed (under torchrun or SLURM; ignored in a single process)"
    )
    g.add_argument("--sharding", nargs="+", default=["*=table_wise"], metavar="GLOB=TYPE",
                   help="sharding type by table-name glob, the last match wins: table_wise, "
                   "row_wise, column_wise, table_row_wise, data_parallel (default: *=table_wise)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where each rank computes (default: CUDA if available)")


def _inputs(args: argparse.Namespace) -> list[Path]:
    """The paths a command reads: its --model, --stats, --teacher, --data, --val and
    NAME=DIR models (a DIR@START:STOP data reference reads DIR)."""
    paths = [Path(v) for v in (getattr(args, k, None) for k in ("model", "stats", "teacher")) if v]
    from afmrec.pipeline.stages import DataRef

    for key in ("data", "val"):
        spec = getattr(args, key, None)
        if spec:
            paths.append(DataRef.parse(spec).path)
    for item in getattr(args, "models", None) or []:
        _, sep, path = str(item).partition("=")
        if sep and path:
            paths.append(Path(path))
    return paths


@contextlib.contextmanager
def job(args: argparse.Namespace) -> Iterator[tuple[Any, Any]]:
    """Joins the torchrun/SLURM process group if there is one, for the stage's duration.

    A command with an output (``--out``) first checks that it is none of its inputs nor
    inside one (whatever ``--overwrite`` says), then holds the output's lock
    (:func:`~afmrec.pipeline.artifacts.output_lock`) until the stage ends: a second
    process writing the same output fails at once.

    In a job of several ranks an error on one rank stops every rank
    (:func:`~afmrec.sharding.env.fail_job`): an input error leaves the stage as a
    :class:`~afmrec.sharding.env.JobFailure` on every rank, which one rank reports.

    Yields:
        ``(env, sharding)``: the :class:`~afmrec.sharding.env.DistEnv` and the
        :class:`~afmrec.sharding.plan.ShardingConfig` of ``--sharding``.
    """
    from afmrec.pipeline.artifacts import check_not_input, output_lock
    from afmrec.pipeline.errors import InputError
    from afmrec.sharding.env import destroy_distributed, fail_job, init_distributed
    from afmrec.sharding.plan import ShardingConfig

    table_sharding = {}
    for item in getattr(args, "sharding", ["*=table_wise"]):
        glob, sep, kind = item.rpartition("=")
        if not sep or not glob:
            raise InputError(f"--sharding expects GLOB=TYPE, got {item!r}")
        table_sharding[glob] = kind
    sharding = ShardingConfig(table_sharding)
    out = getattr(args, "out", None)
    if out is not None:
        check_not_input(out, *_inputs(args))
    env = init_distributed(getattr(args, "device", "auto"))
    if env.rank != 0:
        args.quiet = True
    setup_logging(getattr(args, "quiet", False))
    try:
        with output_lock(out) if out is not None else contextlib.nullcontext():
            yield env, sharding
    except BaseException as e:  # (DCP's CheckpointException is not an Exception)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        failure = fail_job(e)
        if failure is e:
            raise
        raise failure from e
    finally:
        destroy_distributed()


def print_throughput(model_dir: Path) -> None:
    """Prints the per-rank throughput line a stage recorded in ``model_dir/model.json``."""
    from afmrec.pipeline.model_io import load_record
    from afmrec.pipeline.runinfo import RunInfo

    print(RunInfo.from_dict(load_record(model_dir).provenance["throughput"]).summary())
