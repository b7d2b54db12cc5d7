"""Packaging (issue 23): setup.cfg declares every third-party package the code imports.

Structure (issue 24): the top-level folders import each other in one direction only
(common <- models <- sharding <- pipeline <- launch, function-level imports included), and
no module imports another's private (``_name``) names.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Iterator, Mapping

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "pipeline", "sharding", "launch")
PACKAGE = "api"  # the `afmrec` package itself (setup.cfg: afmrec = api)
# The direction of imports: a folder imports only the folders before it. common is the
# leaf (errors, atomic writes); launch (the CLI) is the top.
LAYERS = ("common", "models", "sharding", "pipeline", "api", "launch")
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


# --- structure: the direction of imports, and no private names across modules ---------------


def product_sources() -> dict[str, str]:
    """``{path relative to the repository: source}`` of every module of the package."""
    return {str(path.relative_to(ROOT)): path.read_text()
            for folder in (PACKAGE, *PACKAGES) for path in sorted((ROOT / folder).rglob("*.py"))}


def afmrec_imports(rel: str, source: str) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, module, names imported from it)`` of every import of an afmrec module in
    the file ``rel`` (``pipeline/stats.py``), function-level ones included; relative
    imports are resolved (``from ..errors import X`` in ``pipeline/data/x.py``:
    ``afmrec.pipeline.errors``)."""
    parts = ["afmrec", *Path(rel).with_suffix("").parts]
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "afmrec":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "afmrec":
                yield node.lineno, module, [alias.name for alias in node.names]


def folder_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """``{folder: the other top-level folders its modules import}``."""
    graph: dict[str, set[str]] = {}
    for rel, source in sources.items():
        folder = Path(rel).parts[0]
        for _, module, names in afmrec_imports(rel, source):
            targets = module.split(".")[1:2] or names  # ``from afmrec import pipeline``
            graph.setdefault(folder, set()).update(t for t in targets if t != folder)
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None if it has none."""
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def private_imports(sources: Mapping[str, str]) -> set[tuple[str, str, str]]:
    """``(file, module, name)`` of every private name one module imports from another."""
    return {(rel, module, name)
            for rel, source in sources.items()
            for _, module, names in afmrec_imports(rel, source)
            for name in names if name.startswith("_") and name != "__version__"}


def test_top_level_folders_import_each_other_one_way():
    graph = folder_graph(product_sources())
    assert find_cycle(graph) is None
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if LAYERS.index(b) > LAYERS.index(a))
    assert upward == [], f"imports against {' <- '.join(LAYERS)}"


def test_no_private_name_is_imported_across_modules():
    assert private_imports(product_sources()) == set()


def test_the_structure_checks_catch_a_hidden_cycle_and_a_private_import():
    """The checks above can fail: a cycle hidden in a function-level import, and a
    private name imported relatively, are both found."""
    sources = {
        "sharding/env.py": "def f():\n    from afmrec.pipeline.errors import InputError\n",
        "pipeline/errors.py": "from afmrec.sharding.env import f\n",
        "pipeline/data/x.py": "from ..artifacts import _broadcast, atomic_file\n",
        "launch/cli.py": "from afmrec import pipeline\n",
    }
    graph = folder_graph(sources)
    assert graph == {"sharding": {"pipeline"}, "pipeline": {"sharding"}, "launch": {"pipeline"}}
    assert find_cycle(graph) in (["pipeline", "sharding", "pipeline"], ["sharding", "pipeline", "sharding"])
    assert find_cycle({"launch": {"pipeline"}, "pipeline": {"sharding"}}) is None
    assert private_imports(sources) == {("pipeline/data/x.py", "afmrec.pipeline.artifacts", "_broadcast")}


def test_sharding_runs_without_the_pipeline_and_the_pipeline_registers_its_kinds():
    """At run time too: importing sharding (checkpoints write through common's writers)
    imports no module of the pipeline, and importing any module of the pipeline registers
    every kind of its artifacts with those writers."""
    import subprocess

    code = (
        "import sys\n"
        "import afmrec.sharding.checkpoint, afmrec.sharding.compress, afmrec.sharding.dmp\n"
        "from afmrec.common.files import known_kinds\n"
        "assert not [m for m in sys.modules if m.startswith('afmrec.pipeline')]\n"
        "assert [k.name for k in known_kinds()] == ['Parquet table', 'JSON file']\n"
        "import afmrec.pipeline.train\n"
        "print([k.name for k in known_kinds()])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == str([
        "model folder", "synthetic dataset (train/ and test/)", "dataset", "statistics file",
        "statistics pass save", "report", "batch results table", "serving artifact",
        "Parquet table", "JSON file"])


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
        == ["common", "launch", "models", "pipeline", "sharding"]
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


def test_the_bench_scripts_import_only_what_exists():
    """Every `from afmrec... import name` of bench/ (the sweeps' Python, and the Python
    that bench/multigpu.sh runs inline) names a module and attribute that exist: a move
    inside the package must take these scripts along."""
    import importlib

    statements: list[tuple[str, str, str]] = []
    for path in sorted((ROOT / "bench").iterdir()):
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("afmrec"):
                    statements += [(path.name, node.module, alias.name) for alias in node.names]
        elif path.suffix == ".sh":
            for module, names in re.findall(r"from (afmrec[\w.]*) import ([\w, ]+)", path.read_text()):
                statements += [(path.name, module, name.split(" as ")[0].strip())
                               for name in names.split(",") if name.strip()]
    assert {s for s in statements if s[0] == "multigpu.sh"}, "the pattern no longer finds multigpu.sh's imports"
    missing = []
    for script, module, name in statements:
        try:
            found = hasattr(importlib.import_module(module), name)
        except ImportError:
            found = False
        if not found:
            missing.append(f"{script}: from {module} import {name}")
    assert missing == []
