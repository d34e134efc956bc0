"""The package's rooms import downward only, read from the sources (no module is imported).

    harness  blockllm_factory.cli, .bench, .glue,  drives public commands, builds models and data, runs the
             .demo                                 GLUE recipe through the Trainer front
    patches  blockllm_factory.patches (patches/)   the only code that reaches into LLaMA-Factory, with the import
             and blockllm_factory._import_hook     hook that applies it
    hf       blockllm_factory.hf                   the transformers Trainer front (Trainer, TRL): no LLaMA-Factory;
                                                   the patches build on its shared wiring
    optim    blockllm_factory.optim                the pure-PyTorch optimizer
    base     blockllm_factory (__init__), ._files  standard library only

Within the harness the demo is the lower: bench builds with the demo's builder, the demo imports neither bench nor
patches. The report and the plots of bench share ``bench.summary`` and import neither each other.

Outside packages (docs/architecture.md, "The rules"): the base imports the standard library only, and nothing of this
package when it is imported; the optimizer imports torch and, inside functions, bitsandbytes, nothing else outside the
standard library; only the patches import LLaMA-Factory; the Trainer front and the patches take public names from
the optimizer, and the patches use the Trainer front's shared modules only.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "blockllm_factory"

# room -> the rooms its modules may import: its own and those below it. The demo is the harness's lower half (it builds
# models and data, and patches nothing), so it may not import the patches.
ALLOWED = {
    "base": {"base"},
    "optim": {"base", "optim"},
    "hf": {"base", "optim", "hf"},
    "patches": {"base", "optim", "hf", "patches"},
    "demo": {"base", "optim", "demo"},
    "bench": {"base", "optim", "hf", "patches", "demo", "bench"},
    "glue": {"base", "optim", "hf", "patches", "bench", "glue"},
    "cli": {"base", "optim", "hf", "patches", "demo", "bench", "glue", "cli"},
}
# module-name prefix -> room; the longest matching prefix decides.
PREFIXES = {
    "blockllm_factory": "base",
    "blockllm_factory._files": "base",
    "blockllm_factory.optim": "optim",
    "blockllm_factory.hf": "hf",
    "blockllm_factory.patches": "patches",
    "blockllm_factory._import_hook": "patches",
    "blockllm_factory.demo": "demo",
    "blockllm_factory.bench": "bench",
    "blockllm_factory.glue": "glue",
    "blockllm_factory.cli": "cli",
}
# room -> outside packages its modules must never import (the optimizer is pure PyTorch; the Trainer front runs
# without LLaMA-Factory).
FORBIDDEN_LIBRARIES = {"optim": {"llamafactory", "transformers", "trl"}, "hf": {"llamafactory"}}
# room -> the only outside packages (beyond the standard library) it may import, and those of them it may import only
# inside functions (lazily: importing the room does not import them).
LIBRARIES = {"base": (set(), set()), "optim": ({"torch", "bitsandbytes"}, {"bitsandbytes"})}
# Every reach into LLaMA-Factory lives in the patches. One module outside them imports it, and why; the test fails
# when this list is stale in either direction.
LLAMAFACTORY_OUTSIDE_PATCHES = {
    # reads the argument dataclasses `llamafactory-cli train` parses (parser._TRAIN_ARGS, RayArguments), to refuse a
    # suite's misspelt key before any run starts; it patches nothing
    "blockllm_factory.bench.suite",
}
# The Trainer front's modules the patches build on (docs/architecture.md, "shared with the patches").
HF_SHARED = {"optimizer", "wiring", "engine", "deepspeed_config", "telemetry", "serialization"}
APART = [("blockllm_factory.bench.plots", "blockllm_factory.bench.report")]


def source_modules() -> dict[str, Path]:
    """Module name -> file, as installed: ``patches/`` is ``blockllm_factory.patches`` (setup.cfg package_dir)."""
    modules = {}
    for folder, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "patches", f"{PACKAGE}.patches")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts and parts[0] == "patches" and folder.name == PACKAGE:
                continue  # not expected, but a stray copy would be a second patches room
            modules[".".join([prefix, *parts])] = path
    return modules


MODULES = source_modules()


def library_imports(path: Path) -> dict[str, bool]:
    """Top-level name of every absolute import in ``path`` -> whether one of its imports runs at import time (not
    inside a function)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for imported in names:
            top = imported.split(".")[0]
            found[top] = found.get(top, False) or not in_function
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def imported_libraries(path: Path) -> set[str]:
    """The top-level names of every absolute import in ``path``, at module level or inside functions."""
    return set(library_imports(path))


def imported_names(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` for every absolute ``from module import name`` in ``path``."""
    return [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and not node.level and node.module
        for alias in node.names
    ]


def imported_modules(name: str, path: Path) -> set[str]:
    """Every module of this package that ``path`` imports, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from package import module` imports that module too
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return {module for module in found if module == PACKAGE or module.startswith(PACKAGE + ".")}


def room(module: str) -> str:
    matches = [prefix for prefix in PREFIXES if module == prefix or module.startswith(prefix + ".")]
    return PREFIXES[max(matches, key=len)]


IMPORTS = {name: imported_modules(name, path) for name, path in MODULES.items()}


def test_the_sources_are_found_and_the_parser_sees_their_imports():
    expected = {"blockllm_factory.patches.metrics", "blockllm_factory.demo.assets", "blockllm_factory.bench.report"}
    assert expected <= set(MODULES)
    assert "blockllm_factory.bench.summary" in IMPORTS["blockllm_factory.bench.report"]  # a relative import
    assert "blockllm_factory._files" in IMPORTS["blockllm_factory.patches.metrics"]


def not_allowed(name: str, imports: set[str]) -> list[str]:
    return sorted(module for module in imports if room(module) not in ALLOWED[room(name)])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_own_room_and_those_below(name):
    upward = not_allowed(name, IMPORTS[name])
    assert not upward, f"{MODULES[name].relative_to(ROOT)} ({room(name)}) imports from a room above it: {upward}"


@pytest.mark.parametrize("name", sorted(name for name in MODULES if room(name) in FORBIDDEN_LIBRARIES))
def test_the_optimizer_and_the_trainer_front_import_no_llamafactory(name):
    forbidden = imported_libraries(MODULES[name]) & FORBIDDEN_LIBRARIES[room(name)]
    assert not forbidden, f"{MODULES[name].relative_to(ROOT)} ({room(name)}) imports {sorted(forbidden)}"


def outside_rule(name: str, imports: dict[str, bool]) -> list[str]:
    """What ``name`` imports beyond what :data:`LIBRARIES` allows its room (standard library aside)."""
    allowed, lazily = LIBRARIES[room(name)]
    found = []
    for library, at_import in sorted(imports.items()):
        if library == PACKAGE:
            if room(name) == "base" and at_import:
                found.append(f"{library} at import time")
        elif library in sys.stdlib_module_names:
            continue
        elif library not in allowed:
            found.append(library)
        elif library in lazily and at_import:
            found.append(f"{library} at import time")
    return found


@pytest.mark.parametrize("name", sorted(name for name in MODULES if room(name) in LIBRARIES))
def test_the_base_and_the_optimizer_import_only_what_their_room_allows(name):
    found = outside_rule(name, library_imports(MODULES[name]))
    assert not found, f"{MODULES[name].relative_to(ROOT)} ({room(name)}) imports {found}"


def test_only_the_patches_import_llamafactory():
    outside = {
        name for name, path in MODULES.items() if room(name) != "patches" and "llamafactory" in library_imports(path)
    }
    assert outside == LLAMAFACTORY_OUTSIDE_PATCHES


def in_optim(module: str) -> bool:
    return module == f"{PACKAGE}.optim" or module.startswith(f"{PACKAGE}.optim.")


@pytest.mark.parametrize("name", sorted(name for name in MODULES if room(name) in ("hf", "patches")))
def test_the_front_and_the_patches_use_public_optimizer_names_and_the_fronts_shared_modules(name):
    used = imported_names(MODULES[name])
    private = [f"{module}.{item}" for module, item in used if in_optim(module) and item.startswith("_")]
    private += [module for module, _ in used if in_optim(module) and "._" in module]
    assert not private, f"{MODULES[name].relative_to(ROOT)} uses private names of the optimizer: {private}"
    if room(name) == "patches":
        front = {module.split(".")[2] for module in IMPORTS[name] if module.startswith(f"{PACKAGE}.hf.")}
        assert front <= HF_SHARED, f"{MODULES[name].relative_to(ROOT)} imports the Trainer front's {front - HF_SHARED}"
        assert f"{PACKAGE}.hf" not in IMPORTS[name]  # the front's package: its trainers, not the shared wiring


def test_the_library_rules_catch_imports_at_import_time_and_outside_the_allowed(tmp_path):
    source = tmp_path / "blockllm.py"
    source.write_text(
        "import os\nimport torch\nimport bitsandbytes\nfrom transformers import Trainer\n"
        "def quantize():\n    import bitsandbytes.functional\n    import numpy\n"
    )
    imports = library_imports(source)
    assert imports == {"os": True, "torch": True, "bitsandbytes": True, "transformers": True, "numpy": False}
    assert outside_rule("blockllm_factory.optim.blockllm", imports) == [
        "bitsandbytes at import time",
        "numpy",
        "transformers",
    ]
    base = tmp_path / "files.py"
    base.write_text("import json\nfrom blockllm_factory import optim\ndef lazy():\n    import torch\n")
    assert outside_rule("blockllm_factory._files", library_imports(base)) == [f"{PACKAGE} at import time", "torch"]


@pytest.mark.parametrize(("one", "other"), APART)
def test_siblings_kept_apart_import_neither_each_other(one, other):
    assert other not in IMPORTS[one] and one not in IMPORTS[other]


def test_upward_imports_are_caught_absolute_relative_and_inside_functions(tmp_path):
    source = tmp_path / "assets.py"
    source.write_text(
        "from blockllm_factory.bench.files import write_json\n"
        "from ..patches import trainer\n"
        "def summary():\n"
        "    import blockllm_factory.patches.metrics\n"
        "    from . import data\n"
    )
    imports = imported_modules("blockllm_factory.demo.assets", source)
    assert not_allowed("blockllm_factory.demo.assets", imports) == [
        "blockllm_factory.bench.files",
        "blockllm_factory.patches",
        "blockllm_factory.patches.metrics",
        "blockllm_factory.patches.trainer",
    ]
    assert "blockllm_factory.demo.data" in imports


def test_a_fresh_process_imports_this_checkout_and_installs_the_hook(tmp_path):
    """The editable install (scripts/bootstrap.sh): an edit here is what every process runs, with no reinstall."""
    code = (
        "import json, sys, blockllm_factory, blockllm_factory.patches as p;"
        "print(json.dumps([blockllm_factory.__file__, p.__file__, [type(f).__name__ for f in sys.meta_path]]))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    package, patches, finders = json.loads(result.stdout)
    reinstall = "the tests would run another copy than this checkout: run bash scripts/bootstrap.sh (editable install)"
    assert Path(package) == ROOT / PACKAGE / "__init__.py", reinstall
    assert Path(patches) == ROOT / "patches" / "__init__.py", reinstall
    assert "_PatchFinder" in finders  # blockllm_factory.pth ran
