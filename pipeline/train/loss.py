"""The KTO loss, as a pure function of per-example log-probs (see ../shared/KTO.md).

No Ray and no torch.distributed here: the trainer computes z0 (the all-reduced,
clamped, detached KL estimate) and hands it in, so this file can be checked by hand.
"""

import torch

from pipeline.config import LOSS_TYPES


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    z0: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> torch.Tensor:
    """Per-example losses, shape [n], in row order.

    `labels` is bool (true = desirable); `z0` a scalar already clamped at 0 and detached.
    - kto: desirable lambda_D * (1 - sigma(beta (r - z0))), undesirable
      lambda_U * (1 - sigma(beta (z0 - r))), the paper's Eq. 7 and TRL's default.
    - apo_zero_unpaired: no reference point; desirable 1 - sigma(beta r), undesirable sigma(beta r).
    - kto_pairwise: rows come as preference pairs (desirable, undesirable, desirable, ...); a pair's
      utility is U = v(x, y_w) + v(x, y_l), the paper's values v = lambda_D sigma(beta (r - z0)) and
      lambda_U sigma(beta (z0 - r)), and its loss -log sigma(U), given to both of its rows (so the
      mean over rows is the mean over pairs).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")
    labels = labels.to(torch.bool)
    rewards = policy_logps - reference_logps
    weights = torch.where(
        labels,
        torch.as_tensor(desirable_weight, dtype=rewards.dtype, device=rewards.device),
        torch.as_tensor(undesirable_weight, dtype=rewards.dtype, device=rewards.device),
    )
    if loss_type == "apo_zero_unpaired":
        desirable = 1 - torch.sigmoid(beta * rewards)
        undesirable = torch.sigmoid(beta * rewards)
        return weights * torch.where(labels, desirable, undesirable)

    # The sign turns "reward above the reference point" into a gain for desirable rows
    # and "reward below it" into a gain for undesirable rows.
    sign = torch.where(labels, 1.0, -1.0).to(rewards.dtype)
    value = weights * torch.sigmoid(beta * sign * (rewards - z0))
    if loss_type == "kto_pairwise":
        if len(labels) % 2 or not (labels[0::2].all() and not labels[1::2].any()):
            raise ValueError("kto_pairwise needs rows as (desirable, undesirable) pairs, one after the other")
        pair_losses = -torch.nn.functional.logsigmoid(value[0::2] + value[1::2])
        return pair_losses.repeat_interleave(2)
    return weights - value
