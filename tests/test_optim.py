"""The pure-PyTorch BlockLLM optimizer on tiny models built here (CPU, seconds)."""

import copy
import io
import math
import re
import warnings

import pytest
import torch
from torch import nn

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.carrier import GRADIENT_CARRIER_NAME
from blockllm_factory.optim.masks import pack_mask, unpack_mask
from blockllm_factory.optim.selection import rank_blocks, split_budget, threshold_budget

VOCAB = 64


class TinyLM(nn.Module):
    """Embedding, a few MLP blocks and an output head: enough structure for block selection."""

    def __init__(self, width: int = 32, depth: int = 4, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, width, dtype=dtype)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, 2 * width, dtype=dtype), nn.GELU(), nn.Linear(2 * width, width, dtype=dtype)
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, dtype=dtype)
        self.lm_head = nn.Linear(width, VOCAB, bias=False, dtype=dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(tokens)
        for layer in self.layers:
            hidden = hidden + layer(hidden)
        return self.lm_head(self.norm(hidden))


def make_batches(count: int, seed: int = 0, shift: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (8, 12), generator=generator) for _ in range(count)]


def lm_loss(model: nn.Module, tokens: torch.Tensor, shift: int = 1) -> torch.Tensor:
    # Predict a deterministic function of the current token, so that there is something to learn.
    logits = model(tokens)
    targets = (tokens * 3 + shift) % VOCAB
    return nn.functional.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, loss_offset: float = 0.0):
    loss = lm_loss(model, tokens)
    loss.backward()
    if isinstance(optimizer, BlockLLM):
        optimizer.record_loss(loss.item() + loss_offset)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def flat_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def test_coordinates_changed_per_step_within_budget():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2)
    changed_per_step = []
    for index, tokens in enumerate(make_batches(12)):
        before = flat_params(model)
        train_step(model, optimizer, tokens, loss_offset=(index % 3) * 0.5)
        after = flat_params(model)
        changed_per_step.append(sum(int((after[name] != before[name]).sum()) for name in before))
    assert changed_per_step[0] == 0  # the first step only measures gradient norms
    assert all(0 < changed <= optimizer.budget for changed in changed_per_step[1:])
    # The mask fills the budget as closely as whole coordinates allow.
    assert max(changed_per_step) >= 0.9 * optimizer.budget
    assert optimizer.budget == math.floor(0.1 * optimizer.eligible_numel)


def test_embeddings_and_head_untouched_by_default_and_trainable_on_request():
    torch.manual_seed(0)
    model = TinyLM()
    before = flat_params(model)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, patience=1)
    for index, tokens in enumerate(make_batches(6)):
        train_step(model, optimizer, tokens, loss_offset=index * 0.1)  # rising loss: reselects every step
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])
        assert not dict(model.named_parameters())[name].requires_grad
        assert name not in optimizer.block_names

    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.5, include_embeddings=True)
    assert {"embed_tokens.weight", "lm_head.weight"} <= set(optimizer.block_names)
    assert optimizer.eligible_numel == sum(param.numel() for param in model.parameters())


def test_optimizer_state_bytes_bounded_by_budget():
    torch.manual_seed(0)
    model = TinyLM(width=48)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.95, patience=3)
    full_adam_bytes = 8 * sum(param.numel() for param in model.parameters())
    peak = 0
    for index, tokens in enumerate(make_batches(15)):
        train_step(model, optimizer, tokens, loss_offset=(index % 2) * 0.3)
        peak = max(peak, state_bytes(optimizer))
        selected = sum(optimizer.block_sizes[name] for name in optimizer.selection["names"])
        # Moments are compact (8 bytes per kept coordinate); masks are bit-packed (1 bit per selected coordinate).
        assert state_bytes(optimizer) <= 8 * optimizer.budget + selected / 8 + 8 * len(optimizer.selection["names"])
    assert optimizer.selection_events[-1]["coordinates"] <= optimizer.budget
    assert 0 < peak < 0.07 * full_adam_bytes


def test_bf16_weights_keep_fp32_master_only_for_selected_coordinates():
    torch.manual_seed(0)
    model = TinyLM(dtype=torch.bfloat16)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=50)
    before = flat_params(model)
    for tokens in make_batches(4):
        train_step(model, optimizer, tokens)
    masters = [state["master"] for state in optimizer.state.values()]
    assert masters and all(master.dtype == torch.float32 for master in masters)
    assert sum(master.numel() for master in masters) == optimizer.selection["coordinates"] <= optimizer.budget
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    changed = sum(int((param != before[name]).sum()) for name, param in model.named_parameters())
    assert 0 < changed <= optimizer.budget
    # Written-back weights are the rounded masters.
    for name in optimizer.selection["names"]:
        param = dict(model.named_parameters())[name]
        state = optimizer.state[param]
        mask = optimizer.coordinate_mask(name)
        mask = torch.ones(param.numel(), dtype=bool) if mask is None else mask
        assert torch.equal(param.detach().view(-1)[mask], state["master"].to(torch.bfloat16))


def test_reselection_fires_under_noisy_loss_and_explores_more_blocks():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=3)
    noise = torch.Generator().manual_seed(1)
    for tokens in make_batches(40):
        train_step(model, optimizer, tokens, loss_offset=float(torch.rand((), generator=noise)))
    events = optimizer.selection_events
    assert optimizer.selection["reselections"] == len(events) - 1 >= 3
    assert all(event["reason"].startswith("loss plateau") for event in events[1:])
    visited = {name for event in events for name in event["names"]}
    assert len(visited) > len(events[0]["names"])
    assert sum(optimizer.visit_counts.values()) == sum(len(event["names"]) for event in events)


def test_no_reselection_while_loss_keeps_falling():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=3)
    for index, tokens in enumerate(make_batches(12)):
        train_step(model, optimizer, tokens, loss_offset=-0.5 * index)  # a strictly falling loss signal
    assert optimizer.selection["reselections"] == 0


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_reselect_warmup_ramps_only_the_updates_after_a_reselection(compact):
    """``reselect_warmup=W``: the first selection is untouched (bit for bit), and the k-th update of a later selection
    moves the weights k/W as far as without the ramp (same weights, gradients and fresh moments until then)."""
    warmup = 4
    torch.manual_seed(0)
    models = {0: TinyLM()}
    models[warmup] = copy.deepcopy(models[0])
    settings = {"lr": 1e-2, "sparsity": 0.9, "patience": 3, "compact_gradients": compact}
    optimizers = {
        value: BlockLLM(model.named_parameters(), reselect_warmup=value, **settings) for value, model in models.items()
    }
    batches = make_batches(30)
    offsets = [float(value) for value in torch.rand(30, generator=torch.Generator().manual_seed(1))]
    ramped_params = dict(models[warmup].named_parameters())
    for index, tokens in enumerate(batches):
        before = {value: flat_params(model) for value, model in models.items()}
        for value in (0, warmup):
            train_step(models[value], optimizers[value], tokens, loss_offset=offsets[index])
        steps = [state["step"] for state in optimizers[0].state.values() if "step" in state]
        if optimizers[0].selection["reselections"] and steps and max(steps) == 1:
            break  # the first update of the second selection has just run
        for name, param in models[0].named_parameters():  # first selection: the ramp never applies
            assert torch.equal(param, ramped_params[name]), (index, name)
    else:
        pytest.fail("no reselection in 30 steps")
    assert optimizers[warmup].selection["names"] == optimizers[0].selection["names"]
    moved = 0
    for name, param in models[0].named_parameters():
        plain = param.detach() - before[0][name]
        ramped = ramped_params[name].detach() - before[warmup][name]
        assert torch.equal(ramped != 0, plain != 0), name
        torch.testing.assert_close(ramped, plain / warmup, rtol=1e-4, atol=1e-7)
        moved += int((plain != 0).sum())
    assert moved > 0
    assert optimizers[warmup].param_groups[0]["lr"] == 1e-2  # the group's rate, as the scheduler sees it, unchanged


def test_reselect_until_keeps_the_selection_after_that_step():
    """The loss rule fires under a noisy loss; with ``reselect_until=N`` no selection is made after step N, and up to
    it the run is the one without the limit."""
    runs = {}
    for until in (0, 12):
        torch.manual_seed(0)
        model = TinyLM()
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=3, reselect_until=until)
        noise = torch.Generator().manual_seed(1)
        for tokens in make_batches(40):
            train_step(model, optimizer, tokens, loss_offset=float(torch.rand((), generator=noise)))
        runs[until] = [event["step"] for event in optimizer.selection_events]
    assert any(step > 12 for step in runs[0])  # without the limit it reselects later too
    assert runs[12] == [step for step in runs[0] if step <= 12] and len(runs[12]) > 1
    assert max(runs[12]) <= 12


def test_visit_frequency_changes_the_pick():
    names = ["a", "b", "c"]
    norms = {"a": 3.0, "b": 2.0, "c": 1.0}
    assert rank_blocks(norms, {"a": 0, "b": 0, "c": 0}, names)[0] == "a"
    assert rank_blocks(norms, {"a": 4, "b": 0, "c": 0}, names)[0] == "b"

    # In the optimizer: with a loss signal that always plateaus, the same dominant block is not picked forever.
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=0.0, sparsity=0.97, patience=1, probe="exact")
    for tokens in [make_batches(1)[0]] * 12:  # same batch, lr 0: identical gradients every step
        train_step(model, optimizer, tokens)
    picks = [tuple(event["names"]) for event in optimizer.selection_events]
    assert len(picks) >= 3 and len(set(picks)) > 1


def test_coverage_spreads_the_budget_over_more_blocks_keeping_each_ones_largest_gradients():
    torch.manual_seed(0)
    tokens = make_batches(1)[0]
    events = {}
    for coverage in (1.0, 4.0):
        model = TinyLM(width=64)
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        reference = copy.deepcopy(model)  # BlockLLM's hooks free the gradients: the reference keeps them
        lm_loss(reference, tokens).backward()
        grads = {name: param.grad.abs().reshape(-1) for name, param in reference.named_parameters()}
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, block_size=256, coverage=coverage)
        for _ in range(2):  # the first step selects from every block's gradient, the second cuts masks and updates
            train_step(model, optimizer, tokens)
        events[coverage] = optimizer.selection_events[-1]
        # Adam's first update moves every kept coordinate (by about the rate): "changed" is "kept". The first step
        # changed nothing, so the mask was cut from the reference's gradient.
        changed = {name: (param.detach() != before[name]).reshape(-1) for name, param in model.named_parameters()}
        assert sum(int(mask.sum()) for mask in changed.values()) <= optimizer.budget
        assert events[coverage]["coordinates"] <= optimizer.budget
        for block_name in events[coverage]["names"]:
            block = optimizer.blocks[block_name]
            kept = changed[block.param][block.start : block.stop]
            magnitudes = grads[block.param][block.start : block.stop]
            assert kept.any()
            if not kept.all():  # the block's largest gradients are the ones kept
                assert magnitudes[kept].min() >= magnitudes[~kept].max()
    # The same budget over about four times the blocks.
    assert len(events[4.0]["names"]) >= 3 * len(events[1.0]["names"])
    assert events[4.0]["coordinates"] >= 0.9 * events[1.0]["coordinates"]


def test_threshold_keep_counts_match_one_threshold_over_laplace_gradients():
    """``keep="threshold"`` estimates, from each block's norm alone, how many of its coordinates lie above one
    |gradient| threshold over all picked blocks; on gradients that are Laplace within each block the estimate is the
    count above the exact threshold, to sampling noise, and the counts fill the budget."""
    generator = torch.Generator().manual_seed(0)
    scales = {"a": 1.0, "b": 0.1, "c": 0.5, "d": 0.3}
    sizes = {"a": 2000, "b": 2000, "c": 8000, "d": 4000}
    values = {}
    for name, scale in scales.items():  # Laplace(0, scale) as the difference of two exponentials
        uniform = torch.rand(2, sizes[name], generator=generator, dtype=torch.float64)
        values[name] = scale * (-uniform[0].log() + uniform[1].log())
    norms = {name: float(value.norm()) for name, value in values.items()}
    budget = 1600
    keep = threshold_budget(list(sizes), sizes, norms, budget)
    every = torch.cat([value.abs() for value in values.values()])
    threshold = every.kthvalue(every.numel() - budget + 1).values
    exact = {name: int((value.abs() >= threshold).sum()) for name, value in values.items()}
    assert sum(keep.values()) == budget
    for name in sizes:
        assert abs(keep.get(name, 0) - exact[name]) <= 0.1 * budget, (name, keep, exact)
    share = {name: keep.get(name, 0) / sizes[name] for name in sizes}
    assert share["a"] > share["c"] > share["d"] > share["b"]  # larger gradients keep more of their block
    # The same fraction of every block (split_budget) keeps by size alone.
    assert split_budget(list(sizes), sizes, budget) == {"a": 200, "b": 200, "c": 800, "d": 400}


def test_threshold_keep_counts_edge_cases():
    sizes = {"a": 100, "b": 300}
    # Blocks that fit the budget are kept whole, as with split_budget.
    assert threshold_budget(["a", "b"], sizes, {"a": 1.0, "b": 1.0}, 400) == {"a": 100, "b": 300}
    # No measured norm among the picked blocks: the same fraction of each.
    assert threshold_budget(["a", "b"], sizes, {}, 200) == split_budget(["a", "b"], sizes, 200)
    # A block whose norm is zero keeps nothing and is dropped; equal per-coordinate sizes share by size.
    assert threshold_budget(["a", "b"], sizes, {"a": 0.0, "b": 3.0}, 50) == {"b": 50}
    equal = threshold_budget(["a", "b"], sizes, {"a": 1.0, "b": math.sqrt(3.0)}, 200)
    assert equal == {"a": 50, "b": 150}


def test_threshold_keep_gives_more_of_the_budget_to_blocks_with_larger_gradients():
    """The optimizer with ``keep="threshold"``: the same blocks as ``"fraction"`` (the ranking does not change), the
    budget filled, each block keeping its largest gradients, and a larger share of a block kept where its measured
    gradient is larger per coordinate."""
    torch.manual_seed(0)
    tokens = make_batches(1)[0]
    events, kept_share = {}, {}
    for keep in ("fraction", "threshold"):
        model = TinyLM(width=64)
        torch.manual_seed(1)
        for param in model.parameters():
            param.data.copy_(torch.randn_like(param) * 0.1)
        reference = copy.deepcopy(model)
        lm_loss(reference, tokens).backward()
        grads = {name: param.grad.abs().reshape(-1) for name, param in reference.named_parameters()}
        before = flat_params(model)
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, block_size=256, coverage=4, keep=keep)
        for _ in range(2):
            train_step(model, optimizer, tokens)
        events[keep] = optimizer.selection_events[-1]
        changed = {name: (param.detach() != before[name]).reshape(-1) for name, param in model.named_parameters()}
        assert sum(int(mask.sum()) for mask in changed.values()) <= optimizer.budget
        kept_share[keep] = {}
        for block_name in events[keep]["names"]:
            block = optimizer.blocks[block_name]
            kept = changed[block.param][block.start : block.stop]
            magnitudes = grads[block.param][block.start : block.stop]
            if not kept.all():
                assert magnitudes[kept].min() >= magnitudes[~kept].max()
            rms = float(magnitudes.pow(2).mean().sqrt())
            kept_share[keep][block_name] = (rms, float(kept.float().mean()))
    assert events["threshold"]["coordinates"] == optimizer.budget
    assert set(events["threshold"]["names"]) <= set(events["fraction"]["names"])
    shares = sorted(kept_share["threshold"].values())  # by the block's rms: the kept share grows with it
    assert shares[-1][1] > shares[0][1]
    assert all(later[1] >= earlier[1] - 0.02 for earlier, later in zip(shares, shares[1:]))
    fractions = [share for _, share in kept_share["fraction"].values() if share < 1.0]
    assert max(fractions) - min(fractions) < 0.02  # the same top fraction of every block


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_exact_probe_measures_every_block_without_keeping_gradients(compact):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(
        model.named_parameters(), lr=1e-2, sparsity=0.9, patience=1, probe="exact", compact_gradients=compact
    )
    tokens = make_batches(1)[0]
    lm_loss(model, tokens).backward()
    # Every eligible block was measured, but no gradient survives the backward pass.
    assert all(param.grad is None for param in model.parameters())
    optimizer.step()
    assert set(optimizer.norm_table) == set(optimizer.block_names)
    optimizer.zero_grad()
    lm_loss(model, tokens).backward()
    with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
    compacted = {name for name in optimizer.block_names if optimizer.compact_gradient(name) is not None}
    assert (compacted if compact else with_grad) == set(optimizer.selection["names"])
    assert not (with_grad if compact else compacted)


def assert_resume_is_bit_identical(
    build, steps: int, resume_at: int, dtype: torch.dtype = torch.float32, convert=None
) -> None:
    """Trains TinyLM with ``build(model, seed)``'s optimizer, once unbroken and once saved and restored (into a fresh
    model and an optimizer of another seed) at ``resume_at``: selections and weights must be equal bit for bit.
    ``convert`` may rewrite the saved optimizer state before it is loaded (e.g. into an older layout)."""

    def run(resume=None):
        torch.manual_seed(0)
        model = TinyLM(dtype=dtype)
        optimizer = build(model, 3)
        for index, tokens in enumerate(make_batches(steps, seed=5)):
            if index == resume:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
                buffer.seek(0)
                saved = torch.load(buffer, weights_only=True)
                if convert is not None:
                    saved["optimizer"] = convert(saved["optimizer"])
                model = TinyLM(dtype=dtype)
                model.load_state_dict(saved["model"])
                optimizer = build(model, 99)
                optimizer.load_state_dict(saved["optimizer"])
            train_step(model, optimizer, tokens, loss_offset=(index % 3) * 0.2)
        return model, optimizer

    unbroken, unbroken_optimizer = run()
    resumed, resumed_optimizer = run(resume_at)
    assert unbroken_optimizer.selection["reselections"] >= 2
    assert resumed_optimizer.selection_events == unbroken_optimizer.selection_events
    for (name, a), (_, b) in zip(unbroken.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_resume_is_bit_identical():
    assert_resume_is_bit_identical(
        lambda model, seed: BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=seed), 16, 7
    )


def test_load_state_dict_runs_torchs_hooks_around_a_complete_restore():
    """Hooks registered on the optimizer fire on resume, as for any torch optimizer: a pre-hook sees (and may adapt)
    the dict as saved, a post-hook sees the optimizer already restored."""
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=3)
    for index, tokens in enumerate(make_batches(5, seed=5)):
        train_step(model, optimizer, tokens, loss_offset=(index % 3) * 0.2)
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    resumed = BlockLLM(twin.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=99)
    fired = []

    def adapt_learning_rate(opt, state_dict):
        fired.append(("pre", opt is resumed, "blockllm" in state_dict))
        return {**state_dict, "param_groups": [{**group, "lr": 5e-3} for group in state_dict["param_groups"]]}

    def check_restored(opt):
        fired.append(
            ("post", opt.selection_events == optimizer.selection_events, opt.norm_table == optimizer.norm_table)
        )

    resumed.register_load_state_dict_pre_hook(adapt_learning_rate)
    resumed.register_load_state_dict_post_hook(check_restored)
    resumed.load_state_dict(optimizer.state_dict())

    assert fired == [("pre", True, True), ("post", True, True)]
    trained_groups = [group for group in resumed.param_groups if group["param_names"] != [GRADIENT_CARRIER_NAME]]
    assert [group["lr"] for group in trained_groups] == [5e-3]  # the dict the pre-hook returned was loaded
    assert resumed.selection == optimizer.selection
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        assert resumed.state[twin_param].keys() == optimizer.state[param].keys(), name
        for key, value in optimizer.state[param].items():
            assert (
                torch.equal(resumed.state[twin_param][key], value)
                if torch.is_tensor(value)
                else value == resumed.state[twin_param][key]
            )


# The run state's entries as version 0.2 (the flat update) writes them: checkpoints of earlier runs hold these keys,
# and this version reads them (those of version 0.1.0 lack the last two).
RUN_STATE_ENTRIES = ("selected", "probed", "reselect_after_probe", "visits", "norms", "losses", "step",
                     "reselections", "skipped_steps", "events", "rng_state", "block_names", "budget",
                     "steps_without_loss", "shapes")  # fmt: skip


def test_the_run_state_keeps_its_checkpoint_entries_in_plain_containers():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=3)
    for index, tokens in enumerate(make_batches(6, seed=5)):
        train_step(model, optimizer, tokens, loss_offset=(index % 3) * 0.2)
    run = optimizer.state_dict()["blockllm"]
    assert set(run) == set(RUN_STATE_ENTRIES)
    assert isinstance(run["losses"], list) and isinstance(run["events"][0], dict) and run["step"] == 6
    assert isinstance(run["rng_state"], torch.Tensor) and run["shapes"]["layers.0.0.weight"] == [64, 32]
    run["events"].clear()  # a copy: the optimizer's own record is untouched
    assert optimizer.selection_events


def test_a_checkpoint_of_version_0_1_0_resumes_bit_identical():
    """Version 0.1.0 wrote neither ``steps_without_loss`` nor ``shapes``: such a run state still loads."""

    def as_version_0_1_0(state_dict):
        run = {key: value for key, value in state_dict["blockllm"].items() if key not in RUN_STATE_ENTRIES[-2:]}
        return {**state_dict, "blockllm": run}

    assert_resume_is_bit_identical(
        lambda model, seed: BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=seed),
        12,
        5,
        convert=as_version_0_1_0,
    )


def test_a_run_state_lacking_an_entry_is_refused_naming_it():
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.9)
    state_dict = optimizer.state_dict()
    del state_dict["blockllm"]["visits"]
    with pytest.raises(ValueError, match="lacks 'visits'"):
        BlockLLM(TinyLM().named_parameters(), sparsity=0.9).load_state_dict(state_dict)


@pytest.mark.parametrize("engine", ["BlockLLM", "ZeroBlockLLM"])
def test_state_dict_hooks_see_the_whole_state(engine):
    """torch's state_dict hooks run around the whole dict, run state included, for the ZeRO engine's own dict too."""
    from blockllm_factory.optim.zero import ZeroBlockLLM

    model = TinyLM()
    optimizer = {"BlockLLM": BlockLLM, "ZeroBlockLLM": ZeroBlockLLM}[engine](model.named_parameters(), sparsity=0.9)
    fired = []
    optimizer.register_state_dict_pre_hook(lambda opt: fired.append("pre"))
    optimizer.register_state_dict_post_hook(
        lambda opt, state: fired.append(("post", {"blockllm", "param_groups"} <= set(state)))
    )
    optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "extra": 1})
    state_dict = optimizer.state_dict()
    assert fired == ["pre", ("post", True)]
    assert state_dict["extra"] == 1 and state_dict["blockllm"]["step"] == 0


def test_zero_sparsity_matches_adamw_exactly():
    torch.manual_seed(0)
    reference = TinyLM()
    model = copy.deepcopy(reference)
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    optimizer = BlockLLM(model.named_parameters(), sparsity=0.0, patience=1000, include_embeddings=True, **kwargs)
    adamw = torch.optim.AdamW(reference.parameters(), foreach=False, **kwargs)
    batches = make_batches(6)
    train_step(model, optimizer, batches[0])  # measuring step: no update
    for tokens in batches[1:]:
        train_step(model, optimizer, tokens)
        train_step(reference, adamw, tokens)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_lr_scheduler_drives_learning_rate():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step >= 2 else 1.0)
    batches = make_batches(5)
    for tokens in batches[:2]:
        train_step(model, optimizer, tokens)
        scheduler.step()
    frozen = flat_params(model)
    for tokens in batches[2:]:
        train_step(model, optimizer, tokens)
        scheduler.step()
    assert all(torch.equal(param, frozen[name]) for name, param in model.named_parameters())


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_nonfinite_gradient_skips_step_and_keeps_state(compact):
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=5, compact_gradients=compact)
    for tokens in make_batches(3):
        train_step(model, optimizer, tokens)
    states = copy.deepcopy({id(param): state for param, state in optimizer.state.items()})
    before = flat_params(model)
    selection = optimizer.selection
    # A NaN in one coordinate of a selected block's gradient, as backward produces it (before any hook sees it).
    selected = dict(model.named_parameters())[selection["names"][0]]
    handle = selected.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("nan")))
    loss = lm_loss(model, make_batches(1, seed=9)[0])
    loss.backward()
    handle.remove()
    with pytest.warns(RuntimeWarning, match="non-finite gradient at optimizer step 4"):
        optimizer.step()
    optimizer.zero_grad()
    assert optimizer.skipped_steps == 1 and optimizer.selection == selection
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    for param, state in optimizer.state.items():
        for key, value in state.items():
            saved = states[id(param)][key]
            assert torch.equal(value, saved) if torch.is_tensor(value) else value == saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only; a finite step goes on quietly
        train_step(model, optimizer, make_batches(1, seed=10)[0])
    assert any(not torch.equal(param, before[name]) for name, param in model.named_parameters())


def test_domain_shift_finetune_gains_comparable_share_of_adamw():
    """Pretrain on one mapping, fine-tune on another: BlockLLM at sparsity 0.9 recovers much of AdamW's gain."""
    torch.manual_seed(0)
    base = TinyLM(width=32, depth=3)
    pretrain = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for tokens in make_batches(60, seed=11):
        loss = lm_loss(base, tokens, shift=1)
        loss.backward()
        pretrain.step()
        pretrain.zero_grad()

    batches = make_batches(60, seed=12)
    held_out = make_batches(4, seed=13)

    def finetune(optimizer_factory):
        model = copy.deepcopy(base)
        optimizer = optimizer_factory(model)
        for tokens in batches:
            loss = lm_loss(model, tokens, shift=7)
            loss.backward()
            if isinstance(optimizer, BlockLLM):
                optimizer.record_loss(loss.item())
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            return sum(lm_loss(model, tokens, shift=7).item() for tokens in held_out) / len(held_out)

    with torch.no_grad():
        start = sum(lm_loss(base, tokens, shift=7).item() for tokens in held_out) / len(held_out)
    adamw_loss = finetune(lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2))
    blockllm_loss = finetune(lambda model: BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=5))
    adamw_gain, blockllm_gain = start - adamw_loss, start - blockllm_loss
    assert adamw_gain > 0.5
    print(f"start {start:.3f} adamw {adamw_loss:.3f} blockllm {blockllm_loss:.3f}")
    assert blockllm_gain >= 0.5 * adamw_gain, (start, adamw_loss, blockllm_loss)


# The values docs/bad_inputs.md lists are checked against its quoted messages by test_reliability.py; these are the
# other values of the same checks, and this test also checks that nothing was changed before the refusal.
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": -0.1}, "sparsity"),
        ({"patience": 2.5}, "patience"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (-0.1, 0.9)}, "betas"),
        ({"sparsity": False}, "sparsity"),  # not a number, as in YAML
        ({"probe_blocks": True}, "probe_blocks"),
        ({"include_embeddings": 1}, "include_embeddings"),
        ({"norms": "train"}, "norms"),
        ({"norms": True}, "norms"),
    ],
)
def test_bad_argument_refused_by_name_before_any_change(kwargs, field):
    model = TinyLM()
    with pytest.raises(ValueError, match=rf"^`{field}` must be .*, got {re.escape(repr(kwargs[field]))}\.$"):
        BlockLLM(model.named_parameters(), **kwargs)
    assert all(param.requires_grad for param in model.parameters())


def test_mask_packing_round_trip():
    generator = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 1000):
        mask = torch.rand(numel, generator=generator) > 0.5
        bits = pack_mask(mask)
        assert bits.numel() == math.ceil(numel / 8)
        assert torch.equal(unpack_mask(bits, numel), mask)
    # Over the spans of a tensor's selected blocks only: the bits cover the spans, the coordinates outside read False.
    mask = torch.rand(1000, generator=generator) > 0.5
    ranges = [(0, 64), (128, 200), (600, 1000)]
    inside = torch.zeros(1000, dtype=torch.bool)
    for start, stop in ranges:
        inside[start:stop] = True
    bits = pack_mask(mask, ranges)
    assert bits.numel() == math.ceil((64 + 72 + 400) / 8)
    assert torch.equal(unpack_mask(bits, 1000, ranges), mask & inside)


def test_norm_table_holds_unclipped_norms_when_measured_before_clipping():
    torch.manual_seed(0)
    model = TinyLM()
    # Dense gradients: measure_gradients() before the Trainer clips (compact ones are measured in backward hooks).
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=50, compact_gradients=False)
    batches = make_batches(2)
    train_step(model, optimizer, batches[0])
    lm_loss(model, batches[1]).backward()
    params = dict(model.named_parameters())
    unclipped = {name: params[name].grad.norm().item() for name in optimizer.selection["names"]}
    optimizer.measure_gradients()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # what the Trainer does between backward and step
    optimizer.step()
    for name, norm in unclipped.items():
        assert optimizer.norm_table[name] == pytest.approx(norm, rel=1e-5)
        assert norm > 1e-2  # clipping really changed them


def test_a_loop_that_never_records_the_loss_is_warned_once_and_reselects_every_patience_steps():
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=3)
    with pytest.warns(RuntimeWarning, match="no loss was recorded for 3 optimizer steps") as caught:
        for tokens in make_batches(10, seed=8):
            lm_loss(model, tokens).backward()
            optimizer.step()  # no record_loss: a plain loop written for AdamW
            optimizer.zero_grad()
    assert len([warning for warning in caught if "no loss was recorded" in str(warning.message)]) == 1
    steps = [event["step"] for event in optimizer.selection_events]
    assert steps == [1, 3, 6, 9]  # the first selection, then one every `patience` steps
    assert {event["reason"] for event in optimizer.selection_events[1:]} == {
        "no loss recorded: every `patience` steps"
    }


# ------------------------------------------------------------------------------------------------ selection variants
def test_row_group_blocks_spread_the_budget_over_more_tensors():
    torch.manual_seed(0)
    whole_model, rows_model = TinyLM(width=48), TinyLM(width=48)
    rows_model.load_state_dict(whole_model.state_dict())
    whole = BlockLLM(whole_model.named_parameters(), lr=1e-2, sparsity=0.95, patience=50)
    rows = BlockLLM(rows_model.named_parameters(), lr=1e-2, sparsity=0.95, patience=50, block_size=48 * 8)
    assert rows.budget == whole.budget and rows.eligible_numel == whole.eligible_numel
    assert "layers.0.0.weight[0:8]" in rows.block_names and "layers.0.0.bias" in rows.block_names
    before = flat_params(rows_model)
    for tokens in make_batches(3):
        train_step(whole_model, whole, tokens)
        train_step(rows_model, rows, tokens)
    blocks, kept = rows.blocks, rows.kept_coordinates
    tensors = {blocks[name].param for name in rows.selection["names"]}
    assert len(tensors) > len(whole.selection["names"])  # the same budget now reaches more tensors
    changed = {name: int((param != before[name]).sum()) for name, param in rows_model.named_parameters()}
    assert 0 < sum(changed.values()) <= rows.budget
    # A partly selected tensor holds moments only for the coordinates of its selected row groups.
    params = dict(rows_model.named_parameters())
    for name in tensors:
        state = rows.state[params[name]]
        own = [block for block in blocks.values() if block.param == name]
        assert state["exp_avg"].numel() == sum(kept.get(block.name, 0) for block in own)
        if "mask" in state:
            mask = rows.coordinate_mask(name)
            allowed = torch.zeros_like(mask)
            for block in own:
                if block.name in kept:
                    allowed[block.start : block.stop] = True
            assert not (mask & ~allowed).any()
            # The packed mask holds one bit per coordinate of the selected blocks, not of the whole tensor.
            assert state["mask"].numel() == math.ceil(sum(block.numel for block in own if block.name in kept) / 8)
            assert int(mask.sum()) == state["exp_avg"].numel()


@pytest.mark.parametrize("keep", [{}, {"coverage": 4, "keep": "threshold"}], ids=["fraction", "threshold"])
@pytest.mark.parametrize("norms", ["select", "always", "frozen"])
@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_row_group_blocks_resume_bit_identical(compact, norms, keep):
    """Row groups with the size-normalised score, under each norm policy; and with the threshold's keep counts."""

    def build(model, seed):
        return BlockLLM(
            model.named_parameters(),
            lr=1e-2,
            sparsity=0.9,
            patience=2,
            seed=seed,
            block_size=64,
            score="norm_per_sqrt_size",
            compact_gradients=compact,
            norms=norms,
            **keep,
        )

    assert_resume_is_bit_identical(build, 14, 6)


def test_a_checkpoint_with_whole_tensor_masks_resumes_bit_identical():
    """Checkpoints written before masks covered the selected blocks only held one bit per coordinate of the whole
    tensor: they load (the masks are packed again over the selected blocks) and the run goes on as if unbroken."""

    def build(model, seed):
        return BlockLLM(
            model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=seed, block_size=64, coverage=4
        )

    blocks = build(TinyLM(), 0).blocks
    converted = []

    def as_whole_tensor_masks(state_dict):
        names = [name for group in state_dict["param_groups"] for name in group.get("param_names", [])]
        indices = [index for group in state_dict["param_groups"] for index in group["params"]]
        name_of = dict(zip(indices, names))
        selected = state_dict["blockllm"]["selected"]
        for index, state in state_dict["state"].items():
            if "mask" not in state:
                continue
            name = name_of[index]
            own = sorted((block for block in blocks.values() if block.param == name), key=lambda block: block.start)
            ranges = [(block.start, block.stop) for block in own if block.name in selected]
            numel = own[-1].stop
            if sum(stop - start for start, stop in ranges) < numel:
                state["mask"] = pack_mask(unpack_mask(state["mask"], numel, ranges))
                converted.append(name)
        return state_dict

    assert_resume_is_bit_identical(build, 12, 7, convert=as_whole_tensor_masks)
    assert converted  # partly selected tensors were there, so the old layout was really exercised


def test_size_normalised_score_removes_the_bias_toward_large_blocks():
    # Block "big" has the larger norm only because it is larger: its per-coordinate gradient is smaller.
    norms = {"big": 10.0, "small": 4.0}
    sizes = {"big": 10_000, "small": 100}
    visits = {"big": 0, "small": 0}
    assert rank_blocks(norms, visits, ["big", "small"], sizes, "norm") == ["big", "small"]
    assert rank_blocks(norms, visits, ["big", "small"], sizes, "norm_per_sqrt_size") == ["small", "big"]


def test_changing_block_size_is_refused_on_resume():
    model = TinyLM()
    saved = BlockLLM(model.named_parameters(), block_size=64).state_dict()
    with pytest.raises(ValueError, match="saved for other blocks"):
        BlockLLM(model.named_parameters()).load_state_dict(saved)


def _final_loss(seed: int, ranking: str, monkeypatch, **options) -> float:
    """Mean loss of the last 10 of 60 steps, with BlockLLM's ranking as implemented, or replaced by a random or a
    reversed order of the blocks (the same batches and initial weights for all three)."""
    import random

    import blockllm_factory.optim.blockllm as blockllm_module

    ranked = blockllm_module.rank_blocks
    order = random.Random(seed)
    replacements = {
        "ranked": ranked,
        "random": lambda norms, visits, names, *args, **kwargs: order.sample(list(names), len(names)),
        "reversed": lambda *args, **kwargs: list(reversed(ranked(*args, **kwargs))),
    }
    monkeypatch.setattr(blockllm_module, "rank_blocks", replacements[ranking])
    torch.manual_seed(seed)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=3, **options)
    losses = [train_step(model, optimizer, tokens) for tokens in make_batches(60, seed=seed)]
    monkeypatch.setattr(blockllm_module, "rank_blocks", ranked)
    return sum(losses[-10:]) / 10


@pytest.mark.parametrize(
    "options", [{}, {"block_size": 64, "score": "norm_per_sqrt_size"}], ids=["paper", "row_groups_sqrt_size"]
)
def test_gradient_ranking_beats_random_and_reversed_selection_on_the_same_batches(options, monkeypatch):
    """Fails when the ranking is ignored (ranked ~ random) or inverted (ranked ~ reversed); three seeds."""
    mean = {
        ranking: sum(_final_loss(seed, ranking, monkeypatch, **options) for seed in range(3)) / 3
        for ranking in ("ranked", "random", "reversed")
    }
    assert mean["ranked"] < mean["random"] - 0.08, mean
    assert mean["random"] < mean["reversed"], mean


@pytest.mark.parametrize("compact", [True, False], ids=["compact", "dense"])
def test_row_group_norms_are_taken_in_one_reduction_per_tensor(compact):
    """Every block's gradient norm as measured one block at a time, from one reduction per tensor (plus one for a
    shorter last row group): the first step measures every block of every tensor."""
    torch.manual_seed(0)
    model = TinyLM(width=48)
    reference = TinyLM(width=48)
    reference.load_state_dict(model.state_dict())
    # 7 rows of 48 per block: a (96, 48) matrix has 13 row groups of 7 rows and a last one of 5.
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, block_size=48 * 7, compact_gradients=compact)
    assert "layers.0.0.weight[91:96]" in optimizer.block_names
    tokens = make_batches(1)[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        train_step(model, optimizer, tokens)
    norm_calls = sum(event.count for event in profile.key_averages() if event.key == "aten::linalg_vector_norm")
    tensors = len({block.param for block in optimizer.blocks.values()})
    assert len(optimizer.block_names) > 4 * tensors
    assert norm_calls <= 2 * tensors

    lm_loss(reference, tokens).backward()
    grads = {name: param.grad.reshape(-1) for name, param in reference.named_parameters()}
    expected = {
        name: torch.linalg.vector_norm(grads[block.param][block.start : block.stop], dtype=torch.float32).item()
        for name, block in optimizer.blocks.items()
    }
    assert optimizer.norm_table.keys() == expected.keys()
    for name, value in optimizer.norm_table.items():
        assert value == pytest.approx(expected[name], rel=1e-5), name


def test_norms_always_are_whole_in_every_selection_within_the_budget_and_select_leaves_them_to_the_ranking():
    def train(norms):
        torch.manual_seed(0)
        model = TinyLM()
        before = flat_params(model)
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=1, norms=norms)
        for index, tokens in enumerate(make_batches(8)):
            train_step(model, optimizer, tokens, loss_offset=index * 0.1)  # rising loss: reselects every step
        return optimizer, before, flat_params(model)

    optimizer, before, after = train("always")
    assert optimizer.always_selected == ["norm.weight", "norm.bias"]
    assert len(optimizer.selection_events) >= 4  # the window is cleared at each reselection: every other step
    for event in optimizer.selection_events:
        assert {"norm.weight", "norm.bias"} <= set(event["names"])
        assert event["coordinates"] <= optimizer.budget
    assert optimizer.kept_coordinates["norm.weight"] == optimizer.block_sizes["norm.weight"]  # whole, never masked
    # Every coordinate of the norm changed: it was trained whole at every step.
    assert bool((after["norm.weight"] != before["norm.weight"]).all())

    selected, _, _ = train("select")
    assert any("norm.weight" not in event["names"] for event in selected.selection_events)  # up to the ranking
    assert selected.budget == optimizer.budget and selected.block_names == optimizer.block_names


def test_norms_frozen_are_never_eligible_nor_changed():
    torch.manual_seed(0)
    model = TinyLM()
    before = flat_params(model)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, patience=1, norms="frozen")
    for index, tokens in enumerate(make_batches(6)):
        train_step(model, optimizer, tokens, loss_offset=index * 0.1)
    params = dict(model.named_parameters())
    for name in ("norm.weight", "norm.bias"):
        assert name not in optimizer.block_names and not params[name].requires_grad
        assert torch.equal(params[name], before[name])
    assert optimizer.eligible_numel == sum(
        param.numel() for name, param in params.items() if name.startswith("layers.")
    )


def test_norm_names_and_reserved_blocks_larger_than_the_budget():
    from blockllm_factory.optim.selection import is_norm_name, reserve_blocks

    norms = [
        "model.layers.0.input_layernorm.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.ln_f.weight",
        "encoder.layer.0.output.LayerNorm.weight",
    ]
    others = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight", "ln.weight"]
    assert all(is_norm_name(name) for name in norms)
    assert not any(is_norm_name(name) for name in others)

    sizes = {"a": 30, "b": 10, "c": 100}
    assert reserve_blocks(["a", "b"], sizes, 100) == ({"a": 30, "b": 10}, 60)
    assert reserve_blocks([], sizes, 100) == ({}, 100)
    assert reserve_blocks(["a", "b"], sizes, 20) == ({"a": 15, "b": 5}, 0)  # more than the budget: shared by them


def test_a_patience_given_as_a_share_of_the_run_becomes_steps():
    from blockllm_factory.optim.settings import check, steps_from_share

    assert steps_from_share(0.3333, 150) == 50 and steps_from_share(0.3333, 600) == 200
    assert steps_from_share(0.1, 1000) == 100 and steps_from_share(0.01, 10) == 1  # at least one step
    with pytest.raises(ValueError, match=r"^`share` must be a number in \(0, 1\)"):
        steps_from_share(1.5, 100)
    with pytest.raises(ValueError, match=r"^`total_steps` must be an integer >= 1"):
        steps_from_share(0.5, 0)
    # YAML, the command line and the web UI take a share; BlockLLM(...) takes steps only.
    assert check("patience", 0.25, yaml=True) == 0.25 and check("patience", " 0.25", yaml=True) == 0.25
    assert check("patience", "100", yaml=True) == 100 and check("patience", 100, yaml=True) == 100
    with pytest.raises(
        ValueError, match=r"^`patience` must be an integer from 1 to 1,000,000,000 \(optimizer steps\), got 0.25\.$"
    ):
        BlockLLM(TinyLM().named_parameters(), patience=0.25)


# ------------------------------------------------------------------------------------------------ silent losses
def test_step_before_any_backward_selects_nothing_and_warns_with_the_documented_text():
    """Before: the first selection was made from an empty norm table and kept for `patience` steps, without a word."""
    from helpers import bad_inputs

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=5)
    before = flat_params(model)
    with pytest.warns(RuntimeWarning) as caught:
        optimizer.step()
    assert [str(warning.message) for warning in caught] == [bad_inputs("python-warning")["step_before_backward"]]
    assert optimizer.selection_events == [] and optimizer.selection["step"] == 0
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())
    # The next step with gradients makes the first selection from every block's norm, as an unbroken loop does.
    tokens = make_batches(1, seed=2)[0]
    train_step(model, optimizer, tokens)
    torch.manual_seed(0)
    reference_model = TinyLM()
    reference = BlockLLM(reference_model.named_parameters(), lr=1e-2, sparsity=0.9, patience=5)
    train_step(reference_model, reference, tokens)
    assert optimizer.selection_events == reference.selection_events and optimizer.norm_table == reference.norm_table


def test_compiled_step_runs_uncompiled_and_equals_the_plain_step_bit_for_bit():
    """torch.compile(optimizer.step) is supported by running it uncompiled (docs/algorithm.md): no opaque error, and no
    traced kernels that would round the update differently."""

    def run(compiled: bool):
        torch.manual_seed(0)
        model = TinyLM()
        optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=1)
        step = torch.compile(optimizer.step) if compiled else optimizer.step
        for tokens in make_batches(5, seed=0):
            loss = lm_loss(model, tokens)
            loss.backward()
            optimizer.record_loss(loss.item())
            step()
            optimizer.zero_grad()
        return flat_params(model), optimizer.selection_events

    (plain, plain_events), (compiled, compiled_events) = run(False), run(True)
    assert compiled_events == plain_events and len(plain_events) >= 2
    assert all(torch.equal(compiled[name], tensor) for name, tensor in plain.items())


def test_the_package_exports_the_optimizer_lazily():
    """`from blockllm_factory import BlockLLM` works, through the package's module ``__getattr__``: the package itself
    imports the standard library only (tests/test_layout.py), as the site-packages hook imports it everywhere."""
    import blockllm_factory
    from blockllm_factory import BlockLLM as Exported

    assert Exported is BlockLLM and "BlockLLM" not in vars(blockllm_factory)
    with pytest.raises(AttributeError, match="has no attribute 'Optimizer'"):
        blockllm_factory.Optimizer  # noqa: B018
