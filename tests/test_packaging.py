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
PACKAGE = "api"  # the `afmrec` package itself (setup.cfg: afmrec = api)
# Imported, but installed by what is declared: torchrec brings FBGEMM (fbgemm-gpu, or
# fbgemm-gpu-cpu for the CPU stack), and torch's CUDA builds bring Triton (only the GPU
# kernels import it, behind a check).
COMES_WITH = {"fbgemm_gpu": "torchrec", "triton": "torch"}


def imported_modules() -> set[str]:
    """Top-level names of every module imported by the package's code (lazy imports too)."""
    names = set()
    for folder in (PACKAGE, *PACKAGES):
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


SOURCES = ("setup.cfg", "pyproject.toml", "README.md", PACKAGE, *PACKAGES)
IMPORTS = """
import sys
import afmrec
assert "torch" not in sys.modules, "import afmrec must stay light (the CLI's start-up)"
import afmrec.pipeline, afmrec.pipeline.data, afmrec.models, afmrec.sharding, afmrec.launch.cli
from afmrec import AFMConfig, compress_, export
print(afmrec.__file__)
print(afmrec.pipeline.__file__)
print(afmrec.launch.cli.__file__)
print(compress_.__module__, export.__module__, AFMConfig(ratio=4).rank_policy)
"""


def _run(code: str, **env_extra: str) -> list[str]:
    import os
    import subprocess

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def test_afmrec_and_its_subpackages_import_from_a_real_install(tmp_path):
    """`pip install .` (a wheel built by setuptools from this tree) holds the `afmrec`
    package (api/) and its four subpackages, and `import afmrec` loads no torch."""
    import shutil
    import subprocess

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and egg-info into its source tree
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(src)],
                   check=True, capture_output=True, timeout=600)
    assert sorted(p.name for p in (target / "afmrec").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == ["launch", "models", "pipeline", "sharding"]
    lines = _run(IMPORTS, PYTHONPATH=str(target))
    assert all(line.startswith(str(target / "afmrec")) for line in lines[:3]), lines
    assert lines[3] == "afmrec.core afmrec.serving loss"


def test_afmrec_imports_from_the_editable_install():
    """`make setup`'s editable install maps `afmrec` to api/ and the subpackages to the
    folders of this tree."""
    lines = _run(IMPORTS)
    assert lines[:3] == [str(ROOT / "api" / "__init__.py"), str(ROOT / "pipeline" / "__init__.py"),
                         str(ROOT / "launch" / "cli.py")]
    assert lines[3] == "afmrec.core afmrec.serving loss"
