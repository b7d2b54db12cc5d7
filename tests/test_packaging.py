"""Packaging (issue 23): setup.cfg declares every third-party package the code imports."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "sharding", "launch")
# Imported, but installed by what is declared: torchrec brings FBGEMM (fbgemm-gpu, or
# fbgemm-gpu-cpu for the CPU stack), and torch's CUDA builds bring Triton (only the GPU
# kernels import it, behind a check).
COMES_WITH = {"fbgemm_gpu": "torchrec", "triton": "torch"}


def imported_modules() -> set[str]:
    """Top-level names of every module imported by the package's code (lazy imports too)."""
    names = set()
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"afmrec"}


def declared() -> dict[str, set[str]]:
    """Normalised distribution names of install_requires and of each extra."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")

    def names(text: str) -> set[str]:
        reqs = (line.split("#")[0].strip() for line in text.splitlines())
        return {re.split(r"[<>=!~\[; ]", r)[0].lower().replace("_", "-") for r in reqs if r}

    out = {"install_requires": names(config["options"]["install_requires"])}
    out |= {extra: names(text) for extra, text in config["options.extras_require"].items()}
    return out


def test_every_imported_package_is_declared():
    distributions = packages_distributions()
    requirements = declared()
    everything = set().union(*requirements.values())
    missing = {}
    for module in sorted(imported_modules()):
        if module in COMES_WITH:
            assert COMES_WITH[module] in requirements["install_requires"], module
            continue
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not dists & everything:
            missing[module] = sorted(dists)
    assert missing == {}
    # the core stack is a requirement, not an extra or a Makefile-only pin
    assert {"torch", "torchrec", "numpy", "pyarrow", "torchmetrics"} <= requirements["install_requires"]
