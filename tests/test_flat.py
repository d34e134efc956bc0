"""One AdamW update for the whole selection (optim/flat.py) and compensated masters (``master="compensated"``)."""

import copy

import pytest
import torch
from test_optim import TinyLM, assert_resume_is_bit_identical, lm_loss, make_batches, train_step

from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.flat import COMPENSATION_KEY
from blockllm_factory.optim.functional import masked_adamw_
from blockllm_factory.optim.quantization import decode_moments_into, encode_moments_from


def _two_groups(model: torch.nn.Module) -> list[dict]:
    """Matrices with weight decay, vectors without: two parameter groups, so the layout has several classes."""
    named = list(model.named_parameters())
    return [
        {"params": [(name, param) for name, param in named if param.dim() == 2], "weight_decay": 0.1},
        {"params": [(name, param) for name, param in named if param.dim() < 2], "weight_decay": 0.0},
    ]


def _per_tensor_step(param, state, mask, grad, compact, group) -> tuple[torch.Tensor, dict]:
    """The per-tensor update (functional.masked_adamw_, 8-bit moments decoded and encoded per tensor), on copies."""
    data, state = param.detach().clone(), copy.deepcopy(state)
    quantized = "exp_avg_q" in state
    if quantized:
        keep = state["exp_avg_q"].numel()
        state["exp_avg"], state["exp_avg_sq"] = torch.empty(keep), torch.empty(keep)
        decode_moments_into(state, state["exp_avg"], state["exp_avg_sq"])
    state["step"] += 1
    beta1, beta2 = group["betas"]
    masked_adamw_(
        data,
        grad,
        state["exp_avg"],
        state["exp_avg_sq"],
        mask,
        state.get("master"),
        compensation=state.get(COMPENSATION_KEY),
        compact_grad=compact,
        step=state["step"],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
    )
    if quantized:
        encode_moments_from(state, state.pop("exp_avg"), state.pop("exp_avg_sq"))
    return data, state


@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.float32, {}),
        (torch.float32, {"compact_gradients": False}),
        (torch.bfloat16, {}),
        (torch.bfloat16, {"master": "compensated"}),
        (torch.bfloat16, {"master": "compensated", "optim_bits": 8}),
        (torch.float32, {"optim_bits": 8, "compact_gradients": False}),
    ],
    ids=["fp32", "fp32-dense", "bf16-fp32-masters", "bf16-compensated", "bf16-compensated-8bit", "fp32-8bit-dense"],
)
def test_flat_update_is_bit_identical_to_the_per_tensor_update(dtype, options):
    """Every selected tensor's weights and states after one flat step equal, bit for bit, what the per-tensor update
    (masked_adamw_, 8-bit moments encoded per tensor) makes of the same weights, states and gradient."""
    torch.manual_seed(0)
    model = TinyLM(width=64, depth=3, dtype=dtype)
    optimizer = BlockLLM(_two_groups(model), lr=1e-2, sparsity=0.5, patience=1000, block_size=1024, **options)
    batches = make_batches(4)
    for tokens in batches[:3]:  # measure and select, then two updates: moments and masters are not zero any more
        train_step(model, optimizer, tokens)
    loss = lm_loss(model, batches[3])
    loss.backward()
    optimizer.record_loss(loss.item())
    params = dict(model.named_parameters())
    compact = optimizer.compact_gradients
    groups = {name: group for group in optimizer.param_groups for name in group["param_names"]}
    expected = {}
    for name, param in params.items():
        if optimizer.state.get(param):
            grad = optimizer.compact_gradient(name) if compact else param.grad
            expected[name] = _per_tensor_step(
                param, optimizer.state[param], optimizer.coordinate_mask(name), grad.clone(), compact, groups[name]
            )
    optimizer.step()

    assert len(expected) >= 4 and optimizer.selection["reselections"] == 0
    quantized = [name for name in expected if "exp_avg_q" in optimizer.state[params[name]]]
    assert bool(quantized) == (options.get("optim_bits") == 8)
    for name, (data, state) in expected.items():
        assert torch.equal(params[name].detach(), data), name
        actual = optimizer.state[params[name]]
        assert actual.keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(actual[key], value) if torch.is_tensor(value) else actual[key] == value, (name, key)


def _train_bf16(master: str, steps: int) -> tuple[float, BlockLLM]:
    torch.manual_seed(0)
    model = TinyLM(width=64, depth=3, dtype=torch.bfloat16)
    optimizer = BlockLLM(model.named_parameters(), lr=3e-3, sparsity=0.8, patience=10, master=master)
    for tokens in make_batches(steps, seed=1):
        train_step(model, optimizer, tokens)
    with torch.no_grad():
        held_out = sum(lm_loss(model, tokens).item() for tokens in make_batches(4, seed=99)) / 4
    return held_out, optimizer


def test_compensated_masters_hold_two_bytes_a_coordinate_and_train_like_fp32_masters():
    """bf16 weights, the same batches: the held-out loss with compensated masters is within 1% of the one with fp32
    masters (the tolerance); the compensation is bf16, one entry per kept coordinate, and no fp32 master exists."""
    initial = _train_bf16("fp32", 1)[0]
    fp32_loss, fp32_optimizer = _train_bf16("fp32", 40)
    compensated_loss, optimizer = _train_bf16("compensated", 40)
    assert compensated_loss < 0.8 * initial and fp32_loss < 0.8 * initial
    assert abs(compensated_loss - fp32_loss) <= 0.01 * fp32_loss
    states = [state for state in optimizer.state.values() if state]
    assert states and not any("master" in state for state in states)
    compensation = [state[COMPENSATION_KEY] for state in states]
    assert all(value.dtype == torch.bfloat16 for value in compensation)
    assert sum(value.numel() for value in compensation) == optimizer.selection["coordinates"]
    assert any(bool(value.any()) for value in compensation)  # it carries what rounding to bf16 lost
    masters = [state["master"] for state in fp32_optimizer.state.values() if state]
    assert sum(value.numel() * value.element_size() for value in masters) == 2 * sum(
        value.numel() * value.element_size() for value in compensation
    )


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_compensated_masters_resume_bit_identical(optim_bits):
    assert_resume_is_bit_identical(
        lambda model, seed: BlockLLM(
            model.named_parameters(),
            lr=1e-2,
            sparsity=0.5 if optim_bits == 8 else 0.9,
            patience=2,
            seed=seed,
            master="compensated",
            optim_bits=optim_bits,
            block_size=256,
        ),
        12,
        5,
        dtype=torch.bfloat16,
    )


def _separate_tensors(state_dict: dict) -> dict:
    """The per-tensor layout's checkpoint: every state a tensor of its own, no view of a shared buffer."""
    converted = copy.copy(state_dict)
    converted["state"] = {
        index: {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
        for index, state in state_dict["state"].items()
    }
    return converted


def test_a_checkpoint_of_the_per_tensor_layout_resumes_bit_identical():
    """Checkpoints of the per-tensor layout held a separate tensor per state: they load into the flat buffers."""
    assert_resume_is_bit_identical(
        lambda model, seed: BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.9, patience=2, seed=seed),
        12,
        5,
        dtype=torch.bfloat16,
        convert=_separate_tensors,
    )


def test_a_checkpoint_with_fp32_masters_resumes_with_compensated_masters():
    """Switching `master` on resume converts the states: the compensated run goes on where the fp32 one would."""
    torch.manual_seed(0)
    model = TinyLM(dtype=torch.bfloat16)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, patience=50)
    batches = make_batches(6)
    for tokens in batches[:3]:
        train_step(model, optimizer, tokens)
    twin = TinyLM(dtype=torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    switched = BlockLLM(twin.named_parameters(), lr=1e-2, sparsity=0.8, patience=50, master="compensated")
    switched.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for tokens in batches[3:]:
        train_step(model, optimizer, tokens)
        train_step(twin, switched, tokens)
    states = [state for state in switched.state.values() if state]
    assert states and all(COMPENSATION_KEY in state and "master" not in state for state in states)
    assert switched.selection_events == optimizer.selection_events
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        # The compensation carries about 16 of the master's 24 bits: a few weights end a bf16 step apart, and their
        # next updates differ a little with them; every difference stays far below one step of lr 1e-2.
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).abs().max()) <= 2**-9 and int((a != b).sum()) <= 0.05 * a.numel(), name
