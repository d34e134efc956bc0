"""Where BlockLLM's memory goes, measured on live tensors: compact gradients, fp16/bf16 weights, 8-bit moments.

Every comparison runs the same model, batches and seed twice: once with compact gradients (the default) and once with
dense gradients (``compact_gradients=False``, the path DeepSpeed keeps), so that a difference can only come
from where the gradient lives.
"""

import io
import re

import pytest
import torch
from test_optim import TinyLM, flat_params, lm_loss, make_batches

from blockllm_factory.optim import BlockLLM


def assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


def run(
    compact: bool,
    batches: list[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    micro_steps: int = 1,
    max_norm: float | None = None,
    offsets: bool = True,
    **kwargs,
) -> tuple[TinyLM, BlockLLM]:
    """Trains TinyLM with ``micro_steps`` backward passes per optimizer step (gradient accumulation), clipping like
    the Trainer does when ``max_norm`` is set; the loss offsets make the patience rule fire now and then."""
    torch.manual_seed(0)
    model = TinyLM(dtype=dtype)
    options = {"lr": 1e-2, "sparsity": 0.9, "patience": 2, "probe_blocks": 2} | kwargs
    optimizer = BlockLLM(model.named_parameters(), compact_gradients=compact, **options)
    for index in range(0, len(batches), micro_steps):
        losses = []
        for tokens in batches[index : index + micro_steps]:
            loss = lm_loss(model, tokens) / micro_steps
            loss.backward()
            losses.append(loss.item())
        optimizer.record_loss(sum(losses) + (0.3 * (index % 3) if offsets else 0.0))
        if max_norm is not None:
            if compact:
                optimizer.clip_grad_norm_(max_norm, model.parameters())
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("block_size", [0, 64], ids=["tensors", "row_groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compact_gradients_train_bit_for_bit_like_dense_ones(dtype, block_size):
    batches = make_batches(14, seed=1)
    dense_model, dense = run(False, batches, dtype=dtype, block_size=block_size)
    compact_model, compact = run(True, batches, dtype=dtype, block_size=block_size)
    assert dense.selection["reselections"] >= 2  # several masks were cut
    assert compact.selection_events == dense.selection_events
    assert compact.norm_table == dense.norm_table
    assert_same_weights(flat_params(compact_model), flat_params(dense_model))
    assert all(param.dtype == dtype for param in compact_model.parameters())


def _gradient_bytes(model: torch.nn.Module, optimizer: BlockLLM) -> int:
    tensors = [param.grad for param in model.parameters() if param.grad is not None]
    if optimizer.gradient_carrier is not None and optimizer.gradient_carrier.grad is not None:
        tensors.append(optimizer.gradient_carrier.grad)
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@pytest.mark.parametrize("block_size", [0, 128], ids=["tensors", "row_groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_bytes_stay_within_budget_plus_one_tensor_at_every_hook(dtype, block_size):
    """Sampled by a hook registered before the optimizer's: it sees each dense gradient the moment autograd has
    accumulated it, before the optimizer compacts it (the one transient tensor)."""
    batches = make_batches(16, seed=2)
    peaks = {}
    for compact in (True, False):
        torch.manual_seed(0)
        model = TinyLM(width=64, dtype=dtype)
        optimizer_box: list[BlockLLM] = []
        at_hooks: list[int] = []

        def sample(_, model=model, box=optimizer_box, out=at_hooks):
            if box:
                out.append(_gradient_bytes(model, box[0]))

        for param in model.parameters():
            param.register_post_accumulate_grad_hook(sample)
        optimizer = BlockLLM(
            model.named_parameters(),
            lr=1e-2,
            sparsity=0.9,
            patience=2,
            compact_gradients=compact,
            block_size=block_size,
        )
        optimizer_box.append(optimizer)
        for index in range(0, len(batches), 2):
            for tokens in batches[index : index + 2]:
                lm_loss(model, tokens).backward()
            optimizer.record_loss(float(index % 3))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert optimizer.selection["reselections"] >= 2
        element = torch.empty((), dtype=dtype).element_size()
        carrier_element = 2 if dtype == torch.bfloat16 else 4
        largest = max(param.numel() for param in model.parameters()) * element
        bound = (optimizer.budget + 1) * carrier_element + largest
        peaks[compact] = max(at_hooks)
        if compact:
            assert peaks[compact] <= bound, (peaks[compact], bound)
    # The dense path holds whole selected tensors: the bound is what compaction buys, not a loose one.
    assert peaks[False] > peaks[True]


def test_gradient_accumulation_adds_compact_gradients_exactly():
    """Two identical micro-batches per step: their sum is exactly twice one gradient in any dtype, so masks and
    updates of both paths agree bit for bit (patience keeps the first selection: the norms of accumulated selected
    blocks are root-sum-squares of the micro-steps' with compact gradients, see docs/algorithm.md)."""
    batches = [tokens for tokens in make_batches(6, seed=4) for _ in range(2)]
    dense_model, dense = run(False, batches, dtype=torch.bfloat16, micro_steps=2, patience=100, offsets=False)
    compact_model, compact = run(True, batches, dtype=torch.bfloat16, micro_steps=2, patience=100, offsets=False)
    assert compact.selection_events == dense.selection_events
    assert_same_weights(flat_params(compact_model), flat_params(dense_model))
    assert any(
        not torch.equal(a, b) for a, b in zip(flat_params(compact_model).values(), flat_params(TinyLM()).values())
    )


def test_clipping_compact_gradients_matches_torch_clipping_of_dense_ones():
    """At sparsity 0 no mask trims a block: clipping the compact gradients must give exactly the weights that
    torch.nn.utils.clip_grad_norm_ gives on the dense ones."""
    batches = make_batches(6, seed=5)
    dense_model, _ = run(False, batches, sparsity=0.0, max_norm=1e-2)
    compact_model, _ = run(True, batches, sparsity=0.0, max_norm=1e-2)
    unclipped_model, _ = run(True, batches, sparsity=0.0)
    assert_same_weights(flat_params(compact_model), flat_params(dense_model))
    assert any(
        not torch.equal(a, b)
        for a, b in zip(flat_params(compact_model).values(), flat_params(unclipped_model).values())
    )


def test_clipped_norm_is_the_norm_of_the_masked_gradient():
    torch.manual_seed(0)
    model = TinyLM()
    twin = TinyLM()
    twin.load_state_dict(model.state_dict())
    compact = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=50, compact_gradients=True)
    dense = BlockLLM(twin.named_parameters(), lr=1e-2, sparsity=0.9, patience=50, compact_gradients=False)
    batches = make_batches(3, seed=6)
    for tokens in batches[:2]:
        for net, optimizer in ((model, compact), (twin, dense)):
            lm_loss(net, tokens).backward()
            optimizer.step()
            optimizer.zero_grad()
    lm_loss(model, batches[2]).backward()
    lm_loss(twin, batches[2]).backward()
    twin_params = dict(twin.named_parameters())
    masked = []
    for name in dense.selection["names"]:
        param = twin_params[name]
        grad = param.grad.reshape(-1)
        mask = dense.coordinate_mask(name)
        masked.append(grad if mask is None else grad[mask])
    assert any("mask" in state for state in dense.state.values())  # a mask really trims a block here
    expected = torch.linalg.vector_norm(torch.cat(masked))
    norm = compact.clip_grad_norm_(1e-3, model.parameters())
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    clipped = torch.cat([compact.compact_gradient(name) for name in masked_names(compact)])
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1e-3, rel=1e-4)


def masked_names(optimizer: BlockLLM) -> list[str]:
    return [name for name in optimizer.block_names if optimizer.compact_gradient(name) is not None]


def test_fp16_weights_train_under_a_grad_scaler_with_fp32_compact_gradients():
    """torch's GradScaler refuses to unscale fp16 gradients; compact gradients of fp16 weights are kept in fp32, so
    fp16 weights (no fp32 copy of the model) train under loss scaling, and an overflow skips the step."""
    torch.manual_seed(0)
    model = TinyLM(dtype=torch.float16)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer.probe_grad_scale = scaler.get_scale
    before = flat_params(model)
    losses = []
    for index, tokens in enumerate(make_batches(12, seed=7)):
        handle = None
        if index == 6:
            poisoned = next(param for param in model.parameters() if param.requires_grad)
            handle = poisoned.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("inf")))
        loss = lm_loss(model, tokens)
        scaler.scale(loss).backward()
        if handle is not None:
            handle.remove()
        assert optimizer.gradient_carrier.grad.dtype == torch.float32
        optimizer.record_loss(loss.item())
        scaler.unscale_(optimizer)
        optimizer.clip_grad_norm_(1.0, model.parameters())
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:
            optimizer.skip_step("inf/NaN gradients found by the loss scaler")
        optimizer.zero_grad()
        losses.append(loss.item())
    assert optimizer.skipped_steps == 1
    assert all(param.dtype == torch.float16 for param in model.parameters())
    assert all(torch.isfinite(param).all() for param in model.parameters())
    assert any(not torch.equal(param, before[name]) for name, param in model.named_parameters())
    masters = [state["master"] for state in optimizer.state.values()]
    assert masters and sum(master.numel() for master in masters) <= optimizer.budget


# ------------------------------------------------------------------------------------------------ 8-bit moments
class WideMLP(torch.nn.Module):
    """Blocks large enough (>= 4096 kept coordinates) for 8-bit moments."""

    def __init__(self, width: int = 96, depth: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            inputs = inputs + torch.tanh(layer(inputs))
        return self.head(inputs)


def _regression_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    target_map = torch.randn(96, 8, generator=generator)
    batches = []
    for _ in range(count):
        inputs = torch.randn(32, 96, generator=generator)
        batches.append((inputs, inputs @ target_map))
    return batches


def _train_wide(optim_bits: int, steps: int, resume_at: int | None = None) -> tuple[WideMLP, BlockLLM, list[float]]:
    def build(seed: int):
        model = WideMLP()
        optimizer = BlockLLM(
            model.named_parameters(), lr=1e-2, sparsity=0.5, patience=3, optim_bits=optim_bits, seed=seed
        )
        return model, optimizer

    torch.manual_seed(0)
    model, optimizer = build(seed=1)
    losses = []
    for index, (inputs, targets) in enumerate(_regression_batches(steps)):
        if index == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model, optimizer = build(seed=99)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.record_loss(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, optimizer, losses


def test_8bit_moments_hold_a_quarter_of_the_bytes_and_train_like_fp32():
    _, fp32, fp32_losses = _train_wide(32, steps=30)
    _, eight, eight_losses = _train_wide(8, steps=30)
    large = [state for state in eight.state.values() if state and "exp_avg_q" in state]
    small = [state for state in eight.state.values() if state and "exp_avg_q" not in state]
    # Like bitsandbytes, moment vectors of >= 4096 entries are 8-bit; the rest (biases, the head) stay fp32.
    assert large and all(state["exp_avg_q"].dtype == state["exp_avg_sq_q"].dtype == torch.uint8 for state in large)
    assert all("exp_avg" not in state and "exp_avg_sq" not in state for state in large)
    assert all(state["exp_avg"].numel() < 4096 for state in small)
    kept = sum(state["exp_avg_q"].numel() for state in large)
    eight_bytes = sum(
        state[key].numel() * state[key].element_size()
        for state in large
        for key in ("exp_avg_q", "exp_avg_sq_q", "exp_avg_absmax", "exp_avg_sq_absmax")
    )
    assert kept >= 4096 and eight_bytes <= 2.04 * kept  # 2 bytes per coordinate plus two fp32 absmax per 256
    assert fp32.selection["coordinates"] == eight.selection["coordinates"]
    # Both fall to under a quarter, and end within 5% of each other.
    assert eight_losses[-1] < 0.25 * eight_losses[0] and fp32_losses[-1] < 0.25 * fp32_losses[0]
    assert eight_losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)


def test_8bit_resume_is_bit_identical():
    unbroken, unbroken_optimizer, _ = _train_wide(8, steps=14)
    resumed, resumed_optimizer, _ = _train_wide(8, steps=14, resume_at=6)
    assert unbroken_optimizer.selection["reselections"] >= 1
    assert resumed_optimizer.selection_events == unbroken_optimizer.selection_events
    assert_same_weights(flat_params(resumed), flat_params(unbroken))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # optim_bits 16 and compact_gradients "yes" are docs/bad_inputs.md's cases (test_reliability.py)
        ({"optim_bits": True}, "`optim_bits` must be one of 32, 8, got True."),
        ({"compact_gradients": 1}, "`compact_gradients` must be true or false, got 1."),
    ],
)
def test_new_options_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockLLM(TinyLM().named_parameters(), **kwargs)


def test_8bit_moments_of_a_new_selection_are_created_8bit():
    """The hooks of a new selection create its states during backward; fp32 zeros for all of them at once would be
    the optimizer-state peak, so they are made 8-bit directly (codes with absmax 0 decode to exact zeros)."""
    torch.manual_seed(0)
    model = WideMLP()
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.5, patience=3, optim_bits=8)
    (inputs, targets), (more_inputs, more_targets) = _regression_batches(2)
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()  # the first step measures and selects
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(more_inputs), more_targets).backward()  # hooks cut masks, create states
    large = [state for state in optimizer.state.values() if state and "exp_avg_q" in state]
    assert large and all("exp_avg" not in state for state in large)
    assert all(state["exp_avg_absmax"].abs().sum() == 0 for state in large)
