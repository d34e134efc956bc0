"""AdamW on the selected coordinates of one block.

The arithmetic follows ``torch.optim.adamw._single_tensor_adamw`` operation for operation, so that with every
coordinate selected BlockLLM reproduces ``torch.optim.AdamW(foreach=False)`` bit for bit.
"""

import math

import torch


def masked_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    mask: torch.Tensor | None,
    master: torch.Tensor | None,
    *,
    compact_grad: bool = False,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Updates ``param`` in place at the coordinates of ``mask`` (all of them when ``mask`` is None).

    ``exp_avg``/``exp_avg_sq`` (and ``master``, the fp32 copy kept for low-precision weights) are compact: they hold
    one entry per selected coordinate, in the order of the flattened parameter. So is ``grad`` when ``compact_grad``
    is true (gradients compacted to the mask during backward); otherwise it has the parameter's shape.
    """
    flat_param = param.view(-1)
    flat_grad = grad.reshape(-1)
    selected_grad = (flat_grad if mask is None or compact_grad else flat_grad[mask]).float()
    if master is not None:
        weights = master
    elif mask is None:
        weights = flat_param  # fp32 and fully selected: update in place
    else:
        weights = flat_param[mask]

    weights.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(selected_grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(selected_grad, selected_grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    weights.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    if weights is flat_param:
        return
    if mask is None:
        flat_param.copy_(weights)
    else:
        flat_param.masked_scatter_(mask, weights.to(param.dtype))
