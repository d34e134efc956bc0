"""Row-sparse gradients of the embeddings and the head (optim/rows.py): the same training as autograd's dense
gradients, bit for bit, without a vocab x hidden gradient ever being made."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blockllm_factory.optim import BlockLLM, rows
from blockllm_factory.optim.rows import attach_row_gradients
from blockllm_factory.optim.zero import ZeroBlockLLM
from blockllm_factory.patches.storages import StorageTracker

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def tiny_llama(tied: bool, vocab: int = 96, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def train(
    model, routed: bool, steps: int = 6, micro_steps: int = 1, embeds: bool = False, tracker=None, **options
) -> tuple[BlockLLM, list[str]]:
    """Trains with the loss rule firing now and then (patience 2, offsets); ``embeds`` feeds ``inputs_embeds`` made
    outside the embedding module (its rows then come from autograd, the head's from the route)."""
    settings = {"lr": 1e-2, "sparsity": 0.8, "include_embeddings": True, "block_size": 64, "coverage": 4}
    optimizer = BlockLLM(model.named_parameters(), patience=2, **(settings | options))
    names = attach_row_gradients(optimizer, model) if routed else []
    generator = torch.Generator().manual_seed(1)
    if tracker is not None:
        tracker.start()
    for step in range(steps):
        total = 0.0
        for _ in range(micro_steps):
            ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=generator)
            ids[0, -2:] = 0  # padding rows get no gradient from the embedding
            inputs = {"inputs_embeds": model.model.embed_tokens.weight[ids]} if embeds else {"input_ids": ids}
            loss = model(**inputs, labels=ids).loss / micro_steps
            loss.backward()
            total += loss.item()
        optimizer.record_loss(total + 0.3 * (step % 3))
        optimizer.step()
        optimizer.zero_grad()
    if tracker is not None:
        tracker.stop()
    return optimizer, names


@pytest.mark.parametrize("micro_steps", [1, 2], ids=["one_micro_step", "accumulated"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_rows_train_bit_for_bit_like_dense_gradients(tied, micro_steps):
    dense_model, routed_model = tiny_llama(tied), tiny_llama(tied)
    initial = {name: param.detach().clone() for name, param in dense_model.named_parameters()}
    dense, none = train(dense_model, routed=False, micro_steps=micro_steps)
    routed, names = train(routed_model, routed=True, micro_steps=micro_steps)
    assert none == [] and names == (["model.embed_tokens.weight"] if tied else list(EMBEDDINGS))
    assert routed.row_gradient_names == names
    assert [event["names"] for event in routed.selection_events] == [
        event["names"] for event in dense.selection_events
    ]
    assert len(dense.selection_events) >= 2  # a reselection: new masks cut from rows
    for name, value in dense.norm_table.items():
        assert routed.norm_table[name] == pytest.approx(value, rel=1e-5, abs=1e-12), name
    for (name, left), right in zip(dense_model.named_parameters(), routed_model.parameters()):
        assert torch.equal(left, right), name
    for name in names:  # the routed weights did train, on some rows only
        changed = int((routed_model.get_parameter(name) != initial[name]).any(dim=1).sum())
        assert 0 < changed < initial[name].shape[0], name
        assert routed_model.get_parameter(name).grad is None


def test_a_weight_also_used_outside_its_modules_gets_every_part_of_its_gradient():
    # inputs_embeds made outside the module: the tied weight's embedding part comes from autograd to the hooks, the
    # head's through the route; the carrier adds both. (Measured as two parts, so the norms are not the sum's: with
    # everything selected whole, no norm or mask decides anything and the updates must agree.)
    dense_model, routed_model = tiny_llama(True), tiny_llama(True)
    options = {"sparsity": 0.0, "coverage": 1, "steps": 3, "embeds": True}
    train(dense_model, routed=False, **options)
    _, names = train(routed_model, routed=True, **options)
    assert names == ["model.embed_tokens.weight"]
    for (name, left), right in zip(dense_model.named_parameters(), routed_model.parameters()):
        assert torch.allclose(left, right, rtol=1e-5, atol=1e-6), name


def test_no_vocab_sized_gradient_is_made(monkeypatch):
    # The embedding dominates the model: 4096 x 64 fp32 = 1 MiB; the logits of a batch are 384 KiB. Chunks of 64 rows.
    monkeypatch.setattr(rows, "CHUNK_NUMEL", 64 * 64)
    embedding_bytes = 4096 * 64 * 4
    peaks = {}
    for routed in (False, True):
        tracker = StorageTracker("cpu")
        train(
            tiny_llama(True, vocab=4096, hidden=64, layers=1), routed=routed, steps=3, tracker=tracker, sparsity=0.95
        )
        peaks[routed] = tracker.peak
    # Dense: the head's part, the embedding's part and their sum, three vocab x hidden tensors at once.
    assert peaks[True] <= peaks[False] - 1.5 * embedding_bytes, peaks


def test_routes_only_where_rows_can_be_served():
    model = tiny_llama(True)
    assert attach_row_gradients(BlockLLM(model.named_parameters(), block_size=64), model) == []  # not eligible
    whole = BlockLLM(model.named_parameters(), include_embeddings=True, block_size=0)
    assert attach_row_gradients(whole, model) == []  # one block: the whole tensor's gradient is what it measures
    dense = BlockLLM(model.named_parameters(), include_embeddings=True, block_size=64, compact_gradients=False)
    assert attach_row_gradients(dense, model) == []
    zero = ZeroBlockLLM(model.named_parameters(), include_embeddings=True, compact_gradients=False)
    assert not zero.row_gradients_supported()


def test_detach_and_averaging_give_the_modules_their_forward_back():
    model = tiny_llama(False)
    optimizer = BlockLLM(model.named_parameters(), include_embeddings=True, block_size=64)
    assert attach_row_gradients(optimizer, model) == list(EMBEDDINGS)
    assert "forward" in vars(model.lm_head) and "forward" in vars(model.model.embed_tokens)
    copied = copy.deepcopy(model)  # e.g. a reference model: it runs its own weights, through its own forward
    with torch.no_grad():
        copied.lm_head.weight.zero_()
    ids = torch.randint(1, 96, (1, 5))
    assert not copied(input_ids=ids).logits.any() and model(input_ids=ids).logits.any()
    optimizer.average_gradients_across_ranks()  # cross-rank averaging takes whole gradients from the hooks
    assert optimizer.row_gradient_names == []
    assert "forward" not in vars(model.lm_head) and "forward" not in vars(model.model.embed_tokens)
    assert attach_row_gradients(optimizer, model) == []


def test_a_non_finite_row_gradient_skips_the_step_and_changes_nothing():
    model = tiny_llama(True)
    optimizer = BlockLLM(model.named_parameters(), lr=1e-2, sparsity=0.8, include_embeddings=True, block_size=64)
    assert attach_row_gradients(optimizer, model) == ["model.embed_tokens.weight"]
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    for poisoned in (False, True):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        hidden = model.model.embed_tokens(ids)
        if poisoned:  # inf in the embedding's part of the gradient only: the head's rows stay finite
            hidden.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        logits = model(inputs_embeds=hidden).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        optimizer.record_loss(1.0)
        optimizer.step()
        optimizer.zero_grad()
        changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
        assert (optimizer.skipped_steps, bool(changed)) == ((1, False) if poisoned else (0, False)), changed
    assert all(torch.isfinite(param).all() for param in model.parameters())


class _FunctionalHead(torch.nn.Module):
    """An embedding module and a head weight used with F.linear, held by no module as its ``weight``."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(16, 8)
        self.lm_head = torch.nn.Parameter(torch.randn(16, 8))

    def forward(self, ids):
        return torch.nn.functional.linear(self.embed_tokens(ids), self.lm_head)


def test_rows_serve_only_weights_that_plain_modules_alone_hold_and_the_others_are_named():
    from blockllm_factory.optim.selection import is_embedding_name

    model = _FunctionalHead()
    # The head's weight would reach BlockLLM whole through autograd: `auto` leaves the embeddings out, and the
    # check once the model is set up (patches/model_checks.py check_embedding_modules) names why.
    assert rows.unserved_embeddings(model, is_embedding_name) == ["lm_head (held by no module)"]
    assert not rows.rows_serve_embeddings(model, is_embedding_name)
    model.embed_tokens = torch.nn.Embedding(16, 8, max_norm=1.0)  # renormalising: not a plain embedding
    assert rows.unserved_embeddings(model, is_embedding_name) == [
        "lm_head (held by no module)",
        "embed_tokens (Embedding)",
    ]
    plain = torch.nn.Sequential()
    plain.embed_tokens, plain.lm_head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False)
    assert rows.unserved_embeddings(plain, is_embedding_name) == []
    assert rows.rows_serve_embeddings(plain, is_embedding_name)
