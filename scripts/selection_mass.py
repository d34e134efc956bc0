"""How much of the gradient BlockLLM's first selection holds, and how much of that its one-batch view costs.

Issue 24 asks what limits BlockLLM on the real model. This measures it without training: the mean gradient of a model
over ``--batches`` batches of text (the "true" gradient of the data, as far as N batches tell) against the
coordinates BlockLLM itself selects (the optimizer of this package, its first selection: blocks ranked on one batch's
gradient, masks cut on the next batch's, as in training). For each setting it prints the share of the coordinates
selected and the share of the mean gradient they hold, as L2 (a gradient step's first-order decrease is the squared
norm it keeps) and as L1 (Adam's first steps are sign-like: every selected coordinate moves by about the rate, so the
first-order decrease is the sum of the kept |g|). Two references per setting: the same number of coordinates taken
as the mean gradient's own top-k (what any selection of that size could hold at best), and BlockLLM's rule applied
to the mean gradient itself (what a selection made from N batches would hold: the cost of the one-batch view).
Settings ending in ``:exact``, ``:laplace`` or ``:gauss`` measure keep counts by one |gradient| threshold over the
picked blocks instead of the same fraction each (see :func:`_one_threshold`): ``:laplace`` is the estimate of
``blockllm_keep: threshold`` (``selection.threshold_budget``), the other two exist only here.

    python scripts/selection_mass.py runs/demo_real/model runs/demo/domain/domain_pt.json --batches 12

The model folder is any causal LM transformers loads (e.g. ``blockllm-factory demo real-build runs/demo_real`` writes
SmolLM2-135M-Instruct); the data is a JSON list of records with a ``text`` field (the continued-pretraining text of
``recipes/bench/real_pt.yaml``), read in order, ``--batch`` records of ``--tokens`` tokens a batch, fp32 on the CPU.
Memory: the model, its gradient, and three gradient-sized buffers (about 5x the fp32 weights).
"""

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockllm_factory.hf.optimizer import head_block_size
from blockllm_factory.optim import BlockLLM
from blockllm_factory.optim.selection import threshold_budget


def gradients(model, tokenizer, texts: list[str], batch: int, tokens: int, batches: int):
    """The first batch's gradient, the second's, and the mean over ``batches`` batches; each a name -> tensor dict."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    total = {name: torch.zeros_like(param) for name, param in params.items()}
    first = second = None
    for index in range(batches):
        chunk = texts[index * batch : (index + 1) * batch]
        encoded = tokenizer(chunk, return_tensors="pt", truncation=True, max_length=tokens, padding="max_length")
        labels = encoded.input_ids.masked_fill(encoded.attention_mask == 0, -100)
        model.zero_grad(set_to_none=True)
        model(**encoded, labels=labels).loss.backward()
        grads = {name: param.grad.detach().clone() for name, param in params.items()}
        for name, grad in grads.items():
            total[name] += grad
        if index == 0:
            first = grads
        elif index == 1:
            second = grads
        print(f"batch {index + 1}/{batches}", flush=True)
    model.zero_grad(set_to_none=True)
    return first, second, {name: value / batches for name, value in total.items()}


def blockllm_selection(
    model, ranked_on: dict, masked_on: dict, threshold_on: dict | None = None, estimate: str = "exact", **settings
):
    """name -> flat bool tensor of the coordinates BlockLLM trains after its first selection: blocks ranked on
    ``ranked_on`` (the measuring step), masks cut on ``masked_on`` (the next step's gradient). The learning rate is 0:
    nothing changes in the model."""
    named = [(name, param) for name, param in model.named_parameters() if name in ranked_on]
    optimizer = BlockLLM(named, lr=0.0, include_embeddings=True, compact_gradients=False, **settings)
    for grads in (ranked_on, masked_on):
        for name, param in named:
            param.grad = grads[name].clone()
        optimizer.step()
    for _, param in named:  # BlockLLM froze what it did not select: the next setting starts from the whole model
        param.grad = None
        param.requires_grad_(True)
    selected = {name: torch.zeros(param.numel(), dtype=torch.bool) for name, param in named}
    for block_name in optimizer.kept_coordinates:
        block = optimizer.blocks[block_name]
        mask = optimizer.coordinate_mask(block.param)
        span = slice(block.start, block.stop)
        selected[block.param][span] = True if mask is None else mask[span]
    if threshold_on is not None:  # the same blocks, each keeping its share of one threshold over all of them
        return _one_threshold(optimizer, threshold_on, masked_on, selected, estimate)
    return selected


def _one_threshold(optimizer, threshold_on: dict, masked_on: dict, selected: dict, estimate: str) -> dict:
    """The picked blocks keep, instead of the same fraction each (``split_budget``), as many coordinates as lie above
    one |gradient| threshold over all of them on ``threshold_on`` (the ranking step's gradient), about the same total;
    each block's mask is then cut on ``masked_on``. ``estimate``: ``exact`` counts the coordinates above the threshold
    (a bound: the optimizer keeps norms, not gradients); ``laplace`` estimates the counts from each block's norm alone
    as ``blockllm_keep: threshold`` does (``threshold_budget``: its coordinates taken for Laplace with the block's
    root mean square); ``gauss`` likewise for normal coordinates (measured here only)."""
    blocks = [optimizer.blocks[name] for name in optimizer.kept_coordinates]
    budget = sum(int(mask.sum()) for mask in selected.values())
    spans = [threshold_on[block.param].flatten()[block.start : block.stop].abs() for block in blocks]
    if estimate == "exact":
        values = torch.cat(spans)
        threshold = values.kthvalue(values.numel() - budget + 1).values
        keeps = [int((span >= threshold).sum()) for span in spans]
    elif estimate == "laplace":
        names = [block.name for block in blocks]
        sizes = {block.name: span.numel() for block, span in zip(blocks, spans)}
        norms = {block.name: float(span.norm()) for block, span in zip(blocks, spans)}
        counts = threshold_budget(names, sizes, norms, budget)
        keeps = [counts.get(name, 0) for name in names]
    else:
        rms = torch.tensor([float(span.pow(2).mean().sqrt()) for span in spans], dtype=torch.float64)
        sizes = torch.tensor([span.numel() for span in spans], dtype=torch.float64)

        def above(tau: float) -> torch.Tensor:  # expected count above tau in each block, normal coordinates
            return sizes * torch.erfc(tau / (rms * math.sqrt(2)))

        low, high = 0.0, float(rms.max()) * 50
        for _ in range(100):  # bisection on the threshold: the expected total equals the budget
            middle = (low + high) / 2
            low, high = (middle, high) if float(above(middle).sum()) > budget else (low, middle)
        keeps = [min(int(count), span.numel()) for count, span in zip(above(high).round(), spans)]
    result = {name: torch.zeros_like(mask) for name, mask in selected.items()}
    for block, keep in zip(blocks, keeps):
        if keep:
            scores = masked_on[block.param].flatten()[block.start : block.stop].abs()
            result[block.param][block.start + scores.topk(keep).indices] = True
    return result


def shares(mean: dict, selected: dict) -> dict[str, float]:
    coordinates = sum(mask.numel() for mask in selected.values())
    chosen = sum(int(mask.sum()) for mask in selected.values())
    l2 = sum(float((grad.flatten() ** 2).sum()) for grad in mean.values())
    l1 = sum(float(grad.abs().sum()) for grad in mean.values())
    kept_l2 = sum(float((mean[name].flatten()[mask] ** 2).sum()) for name, mask in selected.items())
    kept_l1 = sum(float(mean[name].flatten()[mask].abs().sum()) for name, mask in selected.items())
    return {"coordinates": chosen / coordinates, "l2": kept_l2 / l2, "l1": kept_l1 / l1, "count": chosen}


def top_k(mean: dict, count: int) -> dict:
    """The ``count`` coordinates of largest |mean gradient|, over every tensor."""
    flat = torch.cat([grad.flatten().abs() for grad in mean.values()])
    threshold = flat.kthvalue(flat.numel() - count + 1).values
    return {name: grad.flatten().abs() >= threshold for name, grad in mean.items()}


ESTIMATES = ("exact", "laplace", "gauss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data", help="a JSON list of records with a `text` field")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--settings",
        default="0.95:1,0.95:4,0.95:16,0.9:4,0.8:4,paper,0.95:4:exact,0.95:4:laplace,0.95:4:gauss",
        help="sparsity:coverage with head blocks and the size-normalised score (the defaults' rule), or `paper` "
        "(sparsity 0.95, whole tensors, the norm score); `:exact`, `:laplace` or `:gauss` appended: the picked blocks "
        "keep their share of one threshold (`:laplace` is `blockllm_keep: threshold`, see _one_threshold); "
        "comma-separated",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    with open(args.data, encoding="utf-8") as handle:
        texts = [record["text"] for record in json.load(handle)]
    first, second, mean = gradients(model, tokenizer, texts, args.batch, args.tokens, args.batches)
    block_size = head_block_size(model) or 0
    print(f"mean gradient over {args.batches} batches of {args.batch} x {args.tokens} tokens; blocks of {block_size}")
    print("| setting | coordinates | L2 share | L1 share | top-k by the mean: L2, L1 | the rule on the mean: L2, L1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting in args.settings.split(","):
        fields = setting.split(":")
        estimate = fields[-1] if fields[-1] in ESTIMATES else None  # a variant of _one_threshold
        if fields[0] == "paper":
            settings = {"sparsity": 0.95, "coverage": 1.0, "block_size": 0, "score": "norm"}
        else:
            settings = {"sparsity": float(fields[0]), "coverage": float(fields[1]), "block_size": block_size}
        variant = {} if estimate is None else {"estimate": estimate}
        one_batch = shares(
            mean, blockllm_selection(model, first, second, first if estimate else None, **variant, **settings)
        )
        best = shares(mean, top_k(mean, one_batch["count"]))
        on_mean = shares(
            mean, blockllm_selection(model, mean, mean, mean if estimate else None, **variant, **settings)
        )
        print(
            f"| {setting} | {one_batch['coordinates']:.4f} | {one_batch['l2']:.3f} | {one_batch['l1']:.3f} | "
            f"{best['l2']:.3f}, {best['l1']:.3f} | {on_mean['l2']:.3f}, {on_mean['l1']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
