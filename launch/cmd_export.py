"""Write the serving artifact of a model: one file that loads without afmrec.

The tables go onto FBGEMM's inference kernels (TorchRec's quantize_embeddings) with rows
in fp32, fp16, int8 or int4. Two formats:
  torchscript  traced with torchrec.fx and scripted, the way TorchRec's inference stack
               builds its models (.pt);
  aoti         torch.export, then compiled ahead of time by AOTInductor (.pt2). On CUDA a
               DLRM-DCNv2 may serve its cross network fused (from an AFM model's codes,
               or from the interaction: a Triton kernel per layer, compiled into the
               file), and tables whose rows take at most 512 bytes (fp32, fp16 or int8)
               may be pooled by our Triton lookup kernel; --kernels measure (the
               default) times each against FBGEMM's lookup and the plain network on an
               example batch and keeps the faster: the fastest form on a GPU.
The file is loaded back and checked against the module it came from before it appears.

A server loads it with TorchRec (for FBGEMM's operators) and nothing of afmrec:
  import torch, torchrec
  model = torch.jit.load("afm.pt", map_location="cuda")       # torchscript
  model = torch._inductor.aoti_load_package("afm.pt2")        # aoti
  logits = model(dense, values, lengths)   # (B, N) float32, (L,) int64, (F * B,) int32 -> (B,)

Export runs in one process (the whole model is loaded on --device); the artifact serves
on that kind of device.

Example:
  afmrec export --model runs/demo/afm_finetuned --tables int8 --out runs/demo/afm_int8.pt
  afmrec export --model runs/demo/afm_finetuned --format aoti --out runs/demo/afm.pt2
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .args import add_output, job

HELP = "write a compressed model as a serving artifact (TorchScript or AOTInductor; fp32/fp16/int8/int4 tables)"
log = logging.getLogger("afmrec.export")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a model folder (compressed or not)")
    add_output(parser, "the artifact (.pt for torchscript, .pt2 for aoti)")
    parser.add_argument("--format", choices=("torchscript", "aoti"), default="torchscript",
                        help="torchscript (default) or aoti: torch.export + AOTInductor, which on "
                        "CUDA can hold our fused cross network and lookup kernel (--kernels)")
    parser.add_argument("--kernels", choices=("measure", "ours", "stock"), default="measure",
                        help="aoti on CUDA: our lookup and fused cross network where measured faster "
                        "(default), wherever they apply (ours), or neither (stock)")
    parser.add_argument("--tables", choices=("fp32", "fp16", "int8", "int4"),
                        help="row format of the tables in the artifact (default: the format the "
                        "compressed model's ratio was planned in, `afmrec compress --table-format`; "
                        "fp32 for an uncompressed model)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the device the artifact serves on (default: CUDA if available)")
    parser.add_argument("--check-batch", type=int, default=256,
                        help="rows of the random batch on which the written file is checked "
                        "against the model (0: no check; default: 256)")


def _against_original(size: int, plan: dict, uncompressed_bytes: int | None) -> str:
    """The artifact's size against the original's fp32 checkpoint (and against the rank
    plan's count of served bytes, for a compressed model)."""
    if plan:
        original = plan["checkpoint_bytes_before"]
        return (f", {original / size:.2f}x smaller than the original's fp32 checkpoint "
                f"(planned {original / plan['served_bytes_after']:.2f}x)")
    if uncompressed_bytes:
        return f", {uncompressed_bytes / size:.2f}x smaller than its fp32 checkpoint"
    return ""


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.errors import InputError
    from afmrec.pipeline.export import ExportConfig, export_model
    from afmrec.pipeline.budget import DENSE_BYTES
    from afmrec.pipeline.model_io import load_model, load_record

    # the plan's table format is the default, settled (and checked) before the model loads
    plan = load_record(args.model).plan or {}
    tables = args.tables or plan.get("table_format", "fp32")
    config = ExportConfig(tables=tables, check_batch=args.check_batch, format=args.format, kernels=args.kernels)
    with job(args) as (env, _):
        if env.is_distributed:
            raise InputError("export runs in one process: call `afmrec export` without torchrun")
        model, record = load_model(args.model, env.device)
        device = env.device.type
        source = {"model_dir": str(args.model), "ranks": record.ranks, "method": record.method,
                  "fingerprint": record.fingerprint}
        meta = export_model(model.eval(), record.model, args.out, config, source=source,
                            overwrite=args.overwrite)
    size = args.out.stat().st_size
    if plan and device != plan["serve_device"]:  # said once the artifact exists: an error stays one line
        log.warning("the ratio was planned for serving on %s; this artifact serves on %s",
                    plan["serve_device"], device)
    check = meta.get("check_max_abs_diff")
    log.info("wrote %s (%s, cross network %s, %s lookup): %s params, %s tables, %.1f MiB on disk%s%s",
             args.out, meta["artifact"], meta["cross"], meta["lookup"], f"{meta['params']:,}", meta["tables"],
             size / 2**20, _against_original(size, plan, None if record.compressed else DENSE_BYTES * meta["params"]),
             f"; loaded back, max |logit diff| {check:.2g}" if check is not None else "")
    return 0
