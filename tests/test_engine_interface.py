"""The engine interface (blockllm_factory/optim/interface.py) is the one list: the engines satisfy it, the code that
drives an optimizer uses nothing else of it, and ZeroBlockLLM overrides only the extension points."""

import ast
from pathlib import Path

import torch
from test_optim import TinyLM

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.interface import EXTENSION_POINTS, BlockLLMEngine
from blockllm_factory.optim.zero import ZeroBlockLLM

ROOT = Path(__file__).resolve().parent.parent
# The code that drives a BlockLLM optimizer it is handed (as ``optimizer`` or ``owner``).
DRIVERS = [
    ROOT / "blockllm_factory" / "optim" / "distributed.py",
    *sorted((ROOT / "blockllm_factory" / "hf").glob("*.py")),
]
DRIVERS += sorted((ROOT / "patches").glob("*.py"))
# The protocol's methods and data members, and torch's Optimizer interface (its instance attributes included).
INTERFACE = set(dir(BlockLLMEngine)) | set(BlockLLMEngine.__annotations__) | {"state", "param_groups", "defaults"}
INTERFACE |= {name for name in dir(torch.optim.Optimizer) if not name.startswith("_")}


def _attributes_of(path: Path, names: set[str]) -> set[tuple[str, int]]:
    """``(attribute, line)`` of every ``<name>.<attribute>`` and ``self.<name>.<attribute>`` in the file, for the
    variable names given."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self":
            owner = ast.Name(id=owner.attr)
        if isinstance(owner, ast.Name) and owner.id in names:
            found.add((node.attr, node.lineno))
    return found


def test_both_engines_satisfy_the_interface():
    for engine in (BlockLLM, ZeroBlockLLM):
        optimizer = engine(TinyLM().named_parameters(), sparsity=0.9)
        assert isinstance(optimizer, BlockLLMEngine), engine.__name__
        assert isinstance(optimizer, torch.optim.Optimizer)


def test_the_code_that_drives_an_optimizer_uses_the_interface_only():
    used = {
        f"{path.relative_to(ROOT)}:{line}: optimizer.{name}"
        for path in DRIVERS
        for name, line in _attributes_of(path, {"optimizer", "owner"})
        if name not in INTERFACE
    }
    assert not used, f"not in optim/interface.py's BlockLLMEngine: {sorted(used)}"
    # The scan sees the drivers' uses (a scan that found nothing would check nothing).
    assert {"record_loss", "average_gradients_across_ranks", "reduce_gradients"} <= {
        name for path in DRIVERS for name, _ in _attributes_of(path, {"optimizer"})
    }


def test_the_zero_engine_uses_blockllm_through_the_interface_and_overrides_extension_points_only():
    zero = ROOT / "blockllm_factory" / "optim" / "zero.py"
    tree = ast.parse(zero.read_text(encoding="utf-8"))
    assigned = {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
    }
    own = set(vars(ZeroBlockLLM)) | assigned
    inherited = {name for name, _ in _attributes_of(zero, {"self"}) if name not in own}
    # _state_dict_through_hooks: how the state_dict extension point runs torch's hooks around its own dict.
    assert inherited - INTERFACE - {"_state_dict_through_hooks"} == set()
    overridden = {name for name in own if name in vars(BlockLLM) and not name.startswith("__")}
    assert overridden <= set(EXTENSION_POINTS), overridden - set(EXTENSION_POINTS)
    assert "_measure" in overridden and "state_dict" in overridden
