"""AdamW on the selected coordinates of one block, and the chain of kernels both layouts run.

The arithmetic follows ``torch.optim.adamw._single_tensor_adamw`` operation for operation, so that with every
coordinate selected BlockLLM reproduces ``torch.optim.AdamW(foreach=False)`` bit for bit. Every operation of
:func:`adamw_` is elementwise, so running it once over the concatenation of several blocks' vectors (``flat.py``) gives
each coordinate the bits it gets from running it per block.
"""

import math

import torch


def adamw_(
    weights: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on equally long fp32 vectors (``grad`` already fp32)."""
    weights.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    weights.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def compensated_weights(rounded: torch.Tensor, compensation: torch.Tensor) -> torch.Tensor:
    """The fp32 value a half-precision weight and its compensation stand for (``master="compensated"``)."""
    return rounded.float().add_(compensation)


def round_compensated_(weights: torch.Tensor, compensation: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounds updated fp32 ``weights`` to ``dtype`` and keeps what the rounding lost in ``compensation`` (Kahan's
    correction term, in the weights' own precision); returns the rounded weights. ``weights`` is used up."""
    rounded = weights.to(dtype)
    compensation.copy_(weights.sub_(rounded))
    return rounded


def masked_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None,
    master: torch.Tensor | None,
    *,
    compensation: torch.Tensor | None = None,
    compact_grad: bool = False,
    **hyperparameters: float,
) -> None:
    """Updates ``param`` in place at the coordinates of ``mask`` (all of them when ``mask`` is None); the
    ``hyperparameters`` are :func:`adamw_`'s (``step``, ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``).

    ``exp_avg``/``exp_avg_sq`` (and ``master``, the fp32 copy kept for low-precision weights, or ``compensation``,
    the half-precision correction term kept instead with ``master="compensated"``) are compact: they hold one entry per
    selected coordinate, in the order of the flattened parameter. So is ``grad`` when ``compact_grad`` is true
    (gradients compacted to the mask during backward); otherwise it has the parameter's shape.
    """
    flat_param = param.view(-1)
    flat_grad = grad.reshape(-1)
    selected_grad = (flat_grad if mask is None or compact_grad else flat_grad[mask]).float()
    if master is not None:
        weights = master
    elif compensation is not None:
        weights = compensated_weights(flat_param if mask is None else flat_param[mask], compensation)
    elif mask is None:
        weights = flat_param  # fp32 and fully selected: update in place
    else:
        weights = flat_param[mask]

    adamw_(weights, selected_grad, exp_avg, exp_avg_sq, **hyperparameters)

    if weights is flat_param:
        return
    rounded = weights if compensation is None else round_compensated_(weights, compensation, param.dtype)
    if mask is None:
        flat_param.copy_(rounded)
    else:
        flat_param.masked_scatter_(mask, rounded.to(param.dtype))
