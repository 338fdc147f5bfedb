"""PPO arithmetic against numbers worked out by hand (in the comments), padding included."""

from __future__ import annotations

import math

import pytest
import torch

from align.rlhf.ppo_math import (
    KLController,
    entropy_of,
    explained_variance,
    gae,
    kl_penalized_rewards,
    last_token_index,
    logprobs_of,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


VALUES = t([[1, 2, 3], [4, 5, 6]])
MASK = t([[1, 1, 0], [1, 0, 0]])  # unmasked: 1, 2, 4


def test_masked_moments():
    assert masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)
    assert masked_mean(VALUES, MASK, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # deviations from 7/3: -4/3, -1/3, 5/3; squares sum to 42/9; / 3 = 14/9, unbiased * 3/2 = 7/3
    assert masked_var(VALUES, MASK, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(VALUES, MASK).item() == pytest.approx(7 / 3)


def test_masked_whiten_leaves_padding_at_zero():
    whitened = masked_whiten(VALUES, MASK)
    std = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    assert whitened.tolist()[0] == pytest.approx(expected[0], abs=1e-6)
    assert whitened.tolist()[1] == pytest.approx(expected[1], abs=1e-6)
    kept = masked_whiten(VALUES, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(7 / 3, abs=1e-6)


def test_logprobs_entropy_and_last_token():
    logits = torch.zeros(1, 2, 4)  # uniform over 4 tokens
    assert logprobs_of(logits, torch.tensor([[0, 3]])).tolist()[0] == pytest.approx([-math.log(4)] * 2)
    assert entropy_of(logits).tolist()[0] == pytest.approx([math.log(4)] * 2)
    assert last_token_index(t([[1, 1, 0], [1, 0, 0], [1, 1, 1]])).tolist() == [1, 0, 2]


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 5])
def test_chunked_logprobs_and_entropy_equal_a_full_log_softmax_with_the_same_gradients(rows_per_chunk):
    """The lean path (gather minus logsumexp, a chunk of rows at a time) gives the full log-softmax's values and
    gradients, also from bf16 logits (reduced in float32)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(5, 7, 50) * 4).to(dtype).requires_grad_()
        tokens = torch.randint(0, 50, (5, 7))
        full = torch.log_softmax(logits.float(), dim=-1)
        expected_logprobs = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        expected_entropy = -(full.exp() * full).sum(-1)
        (expected_grad,) = torch.autograd.grad((expected_logprobs.sum() + expected_entropy.sum()), logits)
        lean_logprobs = logprobs_of(logits, tokens, rows_per_chunk)
        lean_entropy = entropy_of(logits, rows_per_chunk)
        assert lean_logprobs.dtype == torch.float32 and lean_entropy.dtype == torch.float32
        assert torch.allclose(lean_logprobs, expected_logprobs, atol=1e-5)
        assert torch.allclose(lean_entropy, expected_entropy, atol=1e-5)
        (lean_grad,) = torch.autograd.grad((lean_logprobs.sum() + lean_entropy.sum()), logits)
        assert torch.allclose(lean_grad.float(), expected_grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_kl_penalized_rewards():
    logprobs = t([[-1, -2, -3], [-1, -1, 0]])
    ref = t([[-1.5, -2, -2], [-2, 0, 0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(t([2.0, -1.0]), logprobs, ref, mask, beta=0.1)
    # kl = logprobs - ref = [[0.5, 0, -1], [1, -1, (pad) 0]]; rewards = -0.1 kl, plus the score on the last token
    assert kl.tolist()[0] == pytest.approx([0.5, 0.0, -1.0]) and kl.tolist()[1] == pytest.approx([1.0, -1.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1 + 2.0])
    assert rewards.tolist()[1] == pytest.approx([-0.1, 0.1 - 1.0, 0.0])


def test_gae_by_hand():
    # gamma 1, lambda 0.5: deltas from the end 1 - 0.7 = 0.3, 0.7 - 0.6 = 0.1, 0.6 - 0.5 = 0.1;
    # A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225
    advantages, returns = gae(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    assert advantages.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert returns.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])


def test_gae_ignores_padding():
    # gamma 0.9, lambda 0.95, last position padding (its value 9 must not leak back):
    # A1 = 2 + 0.9 * 0 - 0.5 = 1.5; A0 = (0 + 0.9 * 0.5 - 1) + 0.9 * 0.95 * 1.5 = -0.55 + 1.2825 = 0.7325
    advantages, returns = gae(t([[0, 2, 5]]), t([[1, 0.5, 9]]), t([[1, 1, 0]]), gamma=0.9, lam=0.95)
    assert advantages.tolist()[0] == pytest.approx([0.7325, 1.5, 0.0])
    assert returns.tolist()[0] == pytest.approx([1.7325, 2.0, 0.0])


def test_policy_loss_by_hand():
    # ratio = [e^0.2 = 1.2214, 1]; advantages [1, -2]; clip 0.1.
    # token 0: max(-1.2214, -1.1) = -1.1 (clipped); token 1: max(2, 2) = 2; loss = (−1.1 + 2) / 2 = 0.45
    # the third token is padding with absurd numbers: it must change nothing.
    loss, stats = policy_loss(t([[-1.0, -0.5, 5.0]]), t([[-1.2, -0.5, 0.0]]), t([[1.0, -2.0, 100.0]]),
                              t([[1, 1, 0]]), clip_range=0.1)
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 0.2 ** 2 / 2)  # mean of 0.5 * 0.04 and 0


def test_value_loss_by_hand():
    # token 0: clipped value 0.5 + clip(0.5, ±0.2) = 0.7; errors (1 - 2)^2 = 1 and (0.7 - 2)^2 = 1.69 -> 1.69;
    # token 1: both (0 - 1)^2 = 1; loss = 0.5 * (1.69 + 1) / 2 = 0.6725
    loss, stats = value_loss(t([[1.0, 0.0, 7.0]]), t([[0.5, 0.0, 0.0]]), t([[2.0, 1.0, -7.0]]), t([[1, 1, 0]]),
                             clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.6725, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    returns, mask = t([[1, 2, 3, 99]]), t([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(t([[2, 2, 2, 0]]), returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(t([[0, 0, 0, 0]]), t([[1, 1, 1, 0]]), mask).item())


def test_kl_controller():
    adaptive = KLController(beta=0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target: the error clips at 0.2; beta *= 1 + 0.2 * 256 / 10000 = 1.00512
    assert adaptive.update(9.0, 256) == pytest.approx(0.100512)
    again = KLController(beta=0.1, target=6.0, horizon=10000)
    # KL 5.4 is 10% under: beta *= 1 - 0.1 * 100 / 10000 = 0.999
    assert again.update(5.4, 100) == pytest.approx(0.0999)
    fixed = KLController(beta=0.05)
    assert fixed.update(100.0, 1000) == 0.05
    restored = KLController(beta=1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored == adaptive
