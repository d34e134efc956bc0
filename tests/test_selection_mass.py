"""scripts/selection_mass.py, the measurement behind docs/benchmarks.md's "What a selection holds of the gradient":
its selections are BlockLLM's own, of the budget's size, and leave the model as they found it."""

import importlib.util

import torch
from helpers import ROOT
from test_optim import TinyLM


def _script():
    spec = importlib.util.spec_from_file_location("selection_mass", ROOT / "scripts" / "selection_mass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gradients(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(param.shape, generator=generator) * (1 + index % 3)
        for index, (name, param) in enumerate(model.named_parameters())
    }


def test_selections_are_blockllms_of_the_budgets_size_and_leave_every_weight_trainable():
    script = _script()
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=2)
    first, second = _gradients(model, 1), _gradients(model, 2)
    mean = {name: (first[name] + second[name]) / 2 for name in first}
    settings = {"sparsity": 0.8, "coverage": 4.0, "block_size": 32}
    selections = {}
    for label, threshold_on, estimate in (
        ("equal", None, "exact"),
        ("exact", first, "exact"),
        ("laplace", first, "laplace"),
    ):
        selections[label] = script.blockllm_selection(model, first, second, threshold_on, estimate, **settings)
        # Before, BlockLLM's freezing of what it did not select carried over to the next setting's optimizer.
        assert all(param.requires_grad for param in model.parameters())
    numel = sum(param.numel() for param in model.parameters())
    budget = round(0.2 * numel)
    equal = script.shares(mean, selections["equal"])
    assert abs(equal["count"] - budget) <= 8 * len(selections["equal"])  # whole coordinates per block
    assert script.shares(mean, selections["exact"])["count"] == equal["count"]  # one threshold, the same total
    assert abs(script.shares(mean, selections["laplace"])["count"] - equal["count"]) <= 0.05 * budget
    best = script.shares(mean, script.top_k(mean, equal["count"]))
    assert best["count"] == equal["count"] and best["l2"] >= equal["l2"] and best["l1"] >= equal["l1"]
    # The rule on the same gradient for blocks and masks keeps the largest |g| of its blocks: never less L2 of that
    # gradient than the selection whose masks were cut on another one.
    own = script.shares(first, script.blockllm_selection(model, first, first, **settings))
    assert own["l2"] >= script.shares(first, selections["equal"])["l2"]


def test_the_laplace_estimate_is_what_blockllm_keep_threshold_trains():
    """`:laplace` measures the optimizer's own ``keep="threshold"``: the same coordinates, whether the script applies
    the estimate to the fraction rule's picked blocks or the optimizer selects with it."""
    script = _script()
    torch.manual_seed(0)
    model = TinyLM(width=16, depth=2)
    first, second = _gradients(model, 1), _gradients(model, 2)
    settings = {"sparsity": 0.8, "coverage": 4.0, "block_size": 32}
    measured = script.blockllm_selection(model, first, second, first, "laplace", **settings)
    trained = script.blockllm_selection(model, first, second, keep="threshold", **settings)
    fraction = script.blockllm_selection(model, first, second, **settings)
    assert all(torch.equal(measured[name], trained[name]) for name in measured)
    assert any(not torch.equal(trained[name], fraction[name]) for name in trained)
