"""What a speed record says about the run itself, so that its numbers can be trusted and
reproduced: the code (git commit, dirty or not), the device and its driver, the package
versions, and the settings every variant shared."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import torch

COMMIT_VARIABLE = "AFMREC_GIT_COMMIT"
"""The commit this environment variable names is recorded, marked as stated rather than
read, in place of what git reads: for a copy of the tree without its ``.git``, or with a
``.git`` that does not describe it (a copy made for a remote machine)."""


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    from ...artifacts import versions

    out = dict(versions())
    for pkg in ("triton", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_metadata(device: torch.device) -> dict[str, Any]:
    """The run's provenance: :func:`~afmrec.pipeline.artifacts.run_record` (the quality
    benchmark's ``afmrec.run``) split into commit and dirtiness, plus the device's name,
    the NVIDIA and CUDA driver versions, CUDA and the versions of torch, TorchRec,
    FBGEMM and Triton."""
    from ...artifacts import run_record

    run = run_record()
    commit = run.get("git_commit")
    source = "git"
    if os.environ.get(COMMIT_VARIABLE):
        commit, source = os.environ[COMMIT_VARIABLE], f"${COMMIT_VARIABLE}"
    elif commit is None:
        source = None
    # git says whether the tree was dirty; a stated commit says so only with "+dirty"
    dirty = None if commit is None else (commit.endswith("+dirty") or (None if source != "git" else False))
    out: dict[str, Any] = {
        "git_commit": commit.removesuffix("+dirty") if commit else None,
        "git_dirty": dirty,
        "git_commit_source": source,
        "host": run.get("device", {}),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": _package_versions(),
        "torch_cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        out["nvidia_driver"] = _nvidia_driver()
        out["cuda_driver_api"] = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else None
    return out


def precision(device: torch.device) -> dict[str, Any]:
    """The dense math every variant ran in (one setting for all)."""
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "dense_dtype": "float32", "device_type": device.type}
