"""kto_loss against values computed by hand from the formulas of ../shared/KTO.md."""

import math

import pytest
import torch

from pipeline.train.loss import kto_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


POLICY = torch.tensor([-1.0, -2.0, -3.0, -4.0])
REFERENCE = torch.tensor([-1.5, -1.5, -2.0, -5.0])  # rewards r = [0.5, -0.5, -1.0, 1.0]
LABELS = torch.tensor([True, True, False, False])
REWARDS = [0.5, -0.5, -1.0, 1.0]


def test_kto_matches_hand_computation_with_weights_and_z0():
    beta, z0, lam_d, lam_u = 0.1, 0.2, 1.5, 0.75
    losses = kto_loss(POLICY, REFERENCE, LABELS, torch.tensor(z0), beta=beta, desirable_weight=lam_d,
                      undesirable_weight=lam_u)
    expected = [lam_d * (1 - sigmoid(beta * (r - z0))) for r in REWARDS[:2]]
    expected += [lam_u * (1 - sigmoid(beta * (z0 - r))) for r in REWARDS[2:]]
    assert losses.shape == (4,)
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # One value worked out on paper: 1.5 * (1 - sigma(0.1 * 0.3)) = 1.5 * (1 - 0.50749944) = 0.73875084
    assert losses[0].item() == pytest.approx(0.73875084, abs=1e-7)


def test_policy_equal_to_reference_and_zero_z0_gives_half_weight():
    losses = kto_loss(REFERENCE, REFERENCE, LABELS, torch.tensor(0.0), desirable_weight=2.0)
    torch.testing.assert_close(losses, torch.tensor([1.0, 1.0, 0.5, 0.5]))


def test_apo_zero_unpaired_ignores_z0():
    beta = 0.1
    for z0 in (0.0, 3.0):
        losses = kto_loss(POLICY, REFERENCE, LABELS, torch.tensor(z0), beta=beta, loss_type="apo_zero_unpaired")
        expected = [1 - sigmoid(beta * r) for r in REWARDS[:2]] + [sigmoid(beta * r) for r in REWARDS[2:]]
        torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("side", [True, False])
def test_single_sided_batches(side):
    labels = torch.full((4,), side)
    losses = kto_loss(POLICY, REFERENCE, labels, torch.tensor(0.0), beta=0.1)
    sign = 1 if side else -1
    expected = [1 - sigmoid(0.1 * sign * r) for r in REWARDS]
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_gradient_reaches_policy_only_and_has_the_analytic_value():
    beta, z0 = 0.1, 0.2
    policy = POLICY.clone().requires_grad_(True)
    losses = kto_loss(policy, REFERENCE, LABELS, torch.tensor(z0), beta=beta)
    losses.sum().backward()
    # d/dr of lambda (1 - sigma(beta s (r - z0))) = -lambda beta s sigma' with s = +1 desirable, -1 undesirable
    expected = []
    for r, sign in zip(REWARDS, (1, 1, -1, -1)):
        s = sigmoid(beta * sign * (r - z0))
        expected.append(-beta * sign * s * (1 - s))
    torch.testing.assert_close(policy.grad, torch.tensor(expected), rtol=1e-5, atol=1e-8)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(POLICY, REFERENCE, LABELS, torch.tensor(0.0), loss_type="dpo")


def test_pairwise_utility_form_matches_hand_computation_and_its_gradient():
    """Rows as pairs (chosen, rejected): U = v_w + v_l with the paper's values, loss -log sigma(U) per
    pair, given to both rows; the gradient of the mean against one worked out by hand."""
    beta, z0, lam_d, lam_u = 0.5, 0.2, 1.2, 0.8
    policy = torch.tensor([-1.0, -3.0, -2.0, -2.5], requires_grad=True)
    reference = torch.tensor([-1.5, -2.0, -2.5, -2.0])  # r = [0.5, -1.0, 0.5, -0.5]
    labels = torch.tensor([True, False, True, False])
    losses = kto_loss(policy, reference, labels, torch.tensor(z0), beta=beta, desirable_weight=lam_d,
                      undesirable_weight=lam_u, loss_type="kto_pairwise")
    r = [0.5, -1.0, 0.5, -0.5]
    values = [lam_d * sigmoid(beta * (r[0] - z0)), lam_u * sigmoid(beta * (z0 - r[1])),
              lam_d * sigmoid(beta * (r[2] - z0)), lam_u * sigmoid(beta * (z0 - r[3]))]
    pairs = [-math.log(sigmoid(values[0] + values[1])), -math.log(sigmoid(values[2] + values[3]))]
    torch.testing.assert_close(losses, torch.tensor([pairs[0], pairs[0], pairs[1], pairs[1]]), rtol=1e-6, atol=1e-7)
    # d mean_pairs / d logp_i = -(1 - sigma(U_p)) / 2 * dv_i/dr_i, dv/dr = lam beta s (1 - s) * (+1 or -1)
    (losses.sum() / 4).backward()  # the step's normalisation: sum over rows / rows = mean over pairs
    expected = []
    for i in range(4):
        pair = i // 2
        u = values[2 * pair] + values[2 * pair + 1]
        s = sigmoid(beta * (r[i] - z0)) if i % 2 == 0 else sigmoid(beta * (z0 - r[i]))
        dv = (lam_d if i % 2 == 0 else -lam_u) * beta * s * (1 - s)
        expected.append(-(1 - sigmoid(u)) / 2 * dv)
    torch.testing.assert_close(policy.grad, torch.tensor(expected), rtol=1e-5, atol=1e-8)


def test_pairwise_refuses_rows_that_are_not_pairs():
    with pytest.raises(ValueError, match="pairs"):
        kto_loss(POLICY, REFERENCE, torch.tensor([True, True, False, False]), torch.tensor(0.0),
                 loss_type="kto_pairwise")
