"""The package's import graph: no module imports another that (directly or through others) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import diffenc_diffusers

PACKAGE_DIR = Path(diffenc_diffusers.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["diffenc_diffusers", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {target for target in targets if target in modules}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def test_import_graph_is_found():
    graph = import_graph()
    assert "diffenc_diffusers.objective" in graph["diffenc_diffusers.pipeline_diffenc"]
    assert "diffenc_diffusers.pipeline_diffenc" in graph["diffenc_diffusers.training.step"]


def test_no_module_imports_itself_back():
    graph = import_graph()
    cycles = []
    for start, imports in graph.items():
        if start.endswith("__init__") or start in ("diffenc_diffusers",):
            continue
        stack, seen = list(imports), set()
        while stack:
            module = stack.pop()
            if module == start:
                cycles.append(start)
                break
            if module in seen or module == "diffenc_diffusers" or module.rsplit(".", 1)[-1] in ("models", "training"):
                continue
            seen.add(module)
            stack.extend(graph.get(module, ()))
    assert cycles == []


def test_networks_do_not_import_the_scheduler():
    """models/ holds networks: the noise schedule they need (the monotone schedule's weights) comes from
    noise_schedule, which imports no scheduler."""
    graph = import_graph()
    reached, stack = set(), [name for name in graph if name.startswith("diffenc_diffusers.models")]
    while stack:
        module = stack.pop()
        if module not in reached:
            reached.add(module)
            stack.extend(graph.get(module, ()))
    assert not {"diffenc_diffusers.scheduling_vdm", "diffenc_diffusers.scheduling_utils"} & reached


ENCODER_TYPE_NAMES = {"none", "nontrainable", "trainable"}


def test_only_the_forward_processes_compare_encoder_type_names():
    """A model kind is its forward-process object: no module outside forward_processes/ branches on the
    `encoder_type` strings (no comparison of an `encoder_type` with "none", "nontrainable" or "trainable")."""
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if "forward_processes" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            names = {o.value for o in operands if isinstance(o, ast.Constant) and o.value in ENCODER_TYPE_NAMES}
            text = ast.unparse(node)
            if names and "encoder_type" in text:
                found.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}: {text}")
    assert found == []
