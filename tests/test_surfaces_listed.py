"""Every reach of the patches (and of the Trainer wiring they share) into LLaMA-Factory, transformers and accelerate
objects is listed in patches/_surfaces.py: an AST scan of the sources finds each ``<object>.<attribute>`` on the
objects those libraries hand the patches, and each must be a listed surface (or one of BlockLLM's own attributes)."""

import ast
from pathlib import Path

from blockllm_factory.patches import _surfaces as surfaces_module

ROOT = Path(__file__).resolve().parent.parent
SCANNED = [*sorted((ROOT / "patches").glob("*.py")), *sorted((ROOT / "blockllm_factory" / "hf").glob("*.py"))]
# The variable names under which the scanned code holds a library's object, and the class (a surface path's first
# part, or a watched module's name for ``module``) whose listed surfaces it may reach.
KINDS = {
    "trainer": "Trainer",
    "accelerator": "Accelerator",
    "engine": "Engine",
    "manager": "Manager",
    "runner": "Runner",
}
# Files whose methods of another class's object (a wrapper installed on the class) name that object ``self``.
SELF_KINDS = {"trainer.py": "Trainer", "webui.py": "Runner"}


def _surfaces() -> list[surfaces_module.Surface]:
    return [surface for _, surfaces in surfaces_module.SURFACES.values() for surface in surfaces]


def allowed_attributes() -> dict[str, set[str]]:
    """Class name (the last part of a surface path's class) -> the attributes listed for it, instance ones included.
    LLaMA-Factory's stage trainers count as ``Trainer``."""
    allowed: dict[str, set[str]] = {}
    for surface in _surfaces():
        parts = surface.path.split(".")
        owner = "Trainer" if parts[0].endswith("Trainer") else parts[0]
        if len(parts) > 1:
            allowed.setdefault(owner, set()).add(parts[1])
        allowed.setdefault(owner, set()).update(surface.attributes)
    return allowed


def module_attributes(patch: str) -> set[str]:
    """What the patch ``patch`` (a file stem) may reach on the LLaMA-Factory modules it is applied to."""
    return {
        surface.path.split(".")[0]
        for watched, (name, surfaces) in surfaces_module.SURFACES.items()
        if name == patch
        for surface in surfaces
        if surface.module == watched
    }


def _ours(attribute: str) -> bool:
    """BlockLLM's own attributes set on a library's object (``trainer._blockllm_feed``), and dunders."""
    return "blockllm" in attribute.lower() or attribute.startswith("__")


def unlisted_reaches(path: Path, source: str) -> list[str]:
    """``file:line: object.attribute`` for every reach in ``source`` that _surfaces.py does not list."""
    allowed = allowed_attributes()
    found = []
    tree = ast.parse(source)
    # ``module``: the parameter of a top-level function of a patch (apply, build_*), i.e. the patched module.
    module_scopes = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and any(argument.arg == "module" for argument in node.args.args)
    ]
    in_module_scope = {id(node) for scope in module_scopes for node in ast.walk(scope)}
    nested_self = {
        id(node)
        for outer in tree.body
        if isinstance(outer, ast.FunctionDef)
        for inner in ast.walk(outer)
        if isinstance(inner, ast.FunctionDef) and inner is not outer
        for node in ast.walk(inner)
    }
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or _ours(node.attr):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
        if name == "module" and id(node) in in_module_scope and path.parent.name == "patches":
            if node.attr not in module_attributes(path.stem):
                found.append((node.lineno, f"{path.name}:{node.lineno}: module.{node.attr}"))
            continue
        kind = KINDS.get(name)
        if name == "self" and isinstance(owner, ast.Name) and id(node) in nested_self:
            kind = SELF_KINDS.get(path.name) if path.parent.name == "patches" else None
        if kind is not None and node.attr not in allowed.get(kind, set()):
            found.append((node.lineno, f"{path.name}:{node.lineno}: {name}.{node.attr} ({kind})"))
    return [text for _, text in sorted(found)]


def test_every_reach_into_the_libraries_is_listed_in_surfaces():
    unlisted = [reach for path in SCANNED for reach in unlisted_reaches(path, path.read_text(encoding="utf-8"))]
    assert unlisted == [], "list these in patches/_surfaces.py:\n" + "\n".join(unlisted)


def test_the_scan_finds_an_unlisted_reach():
    """A patch that reaches something new fails the test above until _surfaces.py lists it."""
    patch = ROOT / "patches" / "trainer.py"
    source = patch.read_text(encoding="utf-8")
    assert unlisted_reaches(patch, source) == []
    added = source + "\n\ndef apply_more(module):\n    return module.CustomTrainer, module.logger.warning\n"
    added += "\n\ndef read(trainer):\n    return trainer.accelerator.gradient_state, trainer.callback_handler\n"
    end = len(source.splitlines())
    assert unlisted_reaches(patch, added) == [
        f"trainer.py:{end + 4}: module.logger",  # module.CustomTrainer is listed (its create_optimizer)
        f"trainer.py:{end + 8}: accelerator.gradient_state (Accelerator)",
        f"trainer.py:{end + 8}: trainer.callback_handler (Trainer)",
    ]


def test_an_instance_attribute_a_release_no_longer_sets_is_named():
    listed = surfaces_module.Surface("accelerate", "Accelerator", attributes=("scaler", "no_such_scaler"))
    assert surfaces_module.problem(listed) == "`accelerate.Accelerator` instance attributes no_such_scaler (missing)"
