"""chatforge.losses against hand-computed values (each expected number is worked out in the comments)."""

import math

import pytest
import torch
import torch.nn.functional as F

from chatforge import losses as L


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# log-probs, entropy


def test_token_logprobs_hand_values():
    # logits [0, log 3] -> p = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # (1, 1, 2)
    assert close(L.token_logprobs(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    assert close(L.token_logprobs(logits, torch.tensor([[0]])), [[math.log(0.25)]])
    # temperature 2: z = [0, log(3)/2] -> p1 = sqrt3 / (1 + sqrt3)
    s3 = math.sqrt(3.0)
    assert close(L.token_logprobs(logits, torch.tensor([[1]]), temperature=2.0), [[math.log(s3 / (1 + s3))]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_naive_gather(temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    got = L.token_logprobs(logits, targets, temperature)
    naive = torch.log_softmax(logits / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    assert torch.allclose(got, naive, atol=1e-6)
    # gradients too
    g1, = torch.autograd.grad(got.sum(), logits)
    g2, = torch.autograd.grad(naive.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_token_logprobs_bf16_input_computed_in_fp32():
    torch.manual_seed(1)
    logits = (torch.randn(2, 4, 50) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 50, (2, 4))
    got = L.token_logprobs(logits, targets)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)


def test_token_logprobs_shape_error():
    with pytest.raises(ValueError, match="token_logprobs"):
        L.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_entropy_hand_values_and_temperature():
    uniform = torch.zeros(1, 1, 4)
    assert close(L.entropy_from_logits(uniform), [[math.log(4.0)]])
    # p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446
    two = torch.tensor([[[0.0, math.log(3.0)]]])
    assert close(L.entropy_from_logits(two), [[0.5623351446188083]])
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 7)
    ref = torch.distributions.Categorical(logits=logits / 0.5).entropy()
    assert torch.allclose(L.entropy_from_logits(logits, temperature=0.5), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# masked reductions and whitening


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert close(L.masked_sum(x, m), 6.0)
    assert close(L.masked_mean(x, m), 2.0)
    assert close(L.masked_var(x, m), 1.0)  # ((-1)^2 + 0 + 1^2) / (3 - 1)
    assert close(L.masked_var(x, m, unbiased=False), 2.0 / 3.0)
    # per-row means; an empty row gives 0 not NaN
    x2 = torch.tensor([[1.0, 3.0, 9.0], [4.0, 5.0, 6.0]])
    m2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(L.masked_mean(x2, m2, dim=1), [2.0, 0.0])
    assert close(L.masked_sum(x2, m2, dim=1), [4.0, 0.0])
    with pytest.raises(ValueError, match="masked_var"):
        L.masked_var(x, torch.tensor([[1, 0, 0, 0]]))


def test_whiten_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased var 1 -> [-1, 0, 1], padding -> 0
    assert close(L.whiten(x, m, eps=0.0), [[-1.0, 0.0, 1.0, 0.0]])
    assert close(L.whiten(x, m, shift_mean=False, eps=0.0), [[1.0, 2.0, 3.0, 0.0]])
    # precomputed (e.g. global) statistics: (x - 0) / sqrt(4)
    assert close(L.whiten(x, m, mean=0.0, var=4.0, eps=0.0), [[0.5, 1.0, 1.5, 0.0]])
    assert close(L.whiten(x, m, mean=torch.tensor(0.0), var=torch.tensor(4.0), eps=0.0), [[0.5, 1.0, 1.5, 0.0]])


def test_whiten_random_mean0_std1_on_mask():
    torch.manual_seed(3)
    x = torch.randn(4, 9) * 5 + 3
    m = (torch.rand(4, 9) > 0.3).float()
    w = L.whiten(x, m)
    assert abs(L.masked_mean(w, m).item()) < 1e-5
    assert abs(L.masked_var(w, m).item() - 1.0) < 1e-5
    assert (w[m == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# language modelling


def test_lm_loss_sum_and_count():
    logits = torch.zeros(2, 3, 4)  # uniform: every token costs log 4
    targets = torch.tensor([[1, 2, -100], [0, 3, 3]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 0]])
    loss_sum, n = L.lm_loss(logits, targets, mask)
    assert n.item() == 3  # (0,0), (0,1), (1,1); (0,2) is ignore_index, (1,0) and (1,2) are masked
    assert close(loss_sum, 3 * math.log(4.0))
    assert close(L.lm_loss_mean(logits, targets, mask), math.log(4.0))
    # nothing counts -> 0 loss, 0 tokens
    s0, n0 = L.lm_loss(logits, targets, torch.zeros_like(mask))
    assert n0.item() == 0 and s0.item() == 0.0 and L.lm_loss_mean(logits, targets, torch.zeros_like(mask)).item() == 0.0


def test_lm_loss_matches_cross_entropy():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 13)
    targets = torch.randint(0, 13, (2, 5))
    loss_sum, n = L.lm_loss(logits, targets)
    assert n.item() == 10
    assert torch.allclose(loss_sum / n, F.cross_entropy(logits.view(-1, 13), targets.view(-1)), atol=1e-6)
    # hand value: logits [0, log 3], target 1 -> -log(3/4)
    s, n = L.lm_loss(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    assert close(s, -math.log(0.75)) and n.item() == 1


def test_lm_loss_gradient_accumulation_invariance():
    """8 micro-batches of 1, each loss_sum / total_count, == one batch of 8 (value and gradients)."""
    torch.manual_seed(5)
    B, T, D, V = 8, 6, 5, 7
    x = torch.randn(B, T, D)
    targets = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T)
    for b in range(B):  # very different numbers of loss tokens per sequence: 1..6
        mask[b, : 1 + b % T] = 1
    head = torch.nn.Linear(D, V)

    loss_sum, n = L.lm_loss(head(x), targets, mask)
    full = loss_sum / n
    full.backward()
    full_grads = [p.grad.clone() for p in head.parameters()]

    head.zero_grad()
    total = mask.sum()  # in training: all-reduced count over micro-batches and ranks
    accum = 0.0
    for b in range(B):
        s, _ = L.lm_loss(head(x[b : b + 1]), targets[b : b + 1], mask[b : b + 1])
        (s / total).backward()
        accum += (s / total).item()
    assert abs(accum - full.item()) < 1e-5
    for p, g in zip(head.parameters(), full_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)

    # the naive mean of per-micro-batch means is NOT the same (so this test can fail)
    naive = sum(L.lm_loss_mean(head(x[b : b + 1]), targets[b : b + 1], mask[b : b + 1]).item() for b in range(B)) / B
    assert abs(naive - full.item()) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# preferences


def test_bradley_terry_known_margins():
    rc = torch.tensor([2.0, 0.5, 2.0, 0.0])
    rr = torch.tensor([0.0, 0.5, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + e^-d): d = 2, 0, 2, -1
    expected = [math.log1p(math.exp(-2)), math.log(2.0), math.log1p(math.exp(-2)), math.log1p(math.exp(1))]
    assert close(L.bradley_terry(rc, rr), expected)
    # margin 1 on the first pair: d = 1 -> log(1 + e^-1) = 0.3132616875
    assert close(L.bradley_terry(rc[:1], rr[:1], margin=1.0), [0.31326168751822286])
    # extreme margins stay finite (logsigmoid)
    big = L.bradley_terry(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert torch.isfinite(big).all() and close(big, [200.0], tol=1e-4)
    assert close(L.preference_accuracy(rc, rr), 0.5)  # 2>0 yes, tie no, 2>0 yes, 0>1 no


def test_dpo_equal_policy_and_reference_is_log2():
    torch.manual_seed(6)
    pc, pr = torch.randn(5) * 10, torch.randn(5) * 10
    losses, cr, rr = L.dpo(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert close(losses, [math.log(2.0)] * 5)
    assert close(cr, [0.0] * 5) and close(rr, [0.0] * 5)


def test_dpo_hand_value_and_ipo():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = (-1 + 2) - (-3 + 2) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    losses, chosen, rejected = L.dpo(pc, pr, rc, rr, beta=0.5)
    assert close(losses, [0.31326168751822286])
    assert close(chosen, [0.5]) and close(rejected, [-0.5])
    assert not chosen.requires_grad
    # d/dpc [-log sigmoid(beta h)] = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1)
    losses.sum().backward()
    assert close(pc.grad, [-0.5 / (1 + math.e)])
    # IPO: (h - 1/(2 beta))^2 -> beta 0.5: (2 - 1)^2 = 1; beta 0.1: (2 - 5)^2 = 9; beta 0.25: 0
    assert close(L.dpo(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0], [1.0])
    assert close(L.dpo(pc, pr, rc, rr, beta=0.1, loss_type="ipo")[0], [9.0])
    assert close(L.dpo(pc, pr, rc, rr, beta=0.25, loss_type="ipo")[0], [0.0])
    # cDPO label smoothing 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    expected = 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1))
    assert close(L.dpo(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)[0], [expected])
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo(pc, pr, rc, rr, beta=0.5, loss_type="hinge?")


# ---------------------------------------------------------------------------------------------------------
# KL and RLHF rewards


def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    ln2 = math.log(2.0)
    assert close(L.kl_penalty(logp, ref, "k1"), [[ln2, 0.0]])
    assert close(L.kl_penalty(logp, ref, "k2"), [[0.5 * ln2**2, 0.0]])
    # k3: r = ref - logp = -ln 2 -> (1/2 - 1) + ln 2 = 0.19314718
    assert close(L.kl_penalty(logp, ref, "k3"), [[ln2 - 0.5, 0.0]])
    # k1 is negative when pi < ref; k3 stays >= 0: r = ln 2 -> (2 - 1) - ln 2
    assert close(L.kl_penalty(ref, logp, "k1"), [[-ln2, 0.0]])
    assert close(L.kl_penalty(ref, logp, "k3"), [[1 - ln2, 0.0]])
    with pytest.raises(ValueError, match="estimator"):
        L.kl_penalty(logp, ref, "k4")


def test_rlhf_rewards_score_on_last_mask_token():
    score = torch.tensor([2.0, 3.0, -1.0])
    kl = torch.full((3, 5), 0.5)
    mask = torch.tensor([
        [1, 1, 1, 0, 0],  # trailing pad after EOS: last = 2
        [1, 0, 0, 0, 0],  # one response token: last = 0
        [0, 1, 1, 1, 1],  # leading prompt zeros, no pad: last = 4
    ])
    rewards, non_score = L.rlhf_rewards(score, kl, mask, kl_coef=0.1)
    e = -0.05  # -0.1 * 0.5 per response token
    assert close(rewards, [
        [e, e, e + 2.0, 0, 0],
        [e + 3.0, 0, 0, 0, 0],
        [0, e, e, e, e - 1.0],
    ])
    assert close(non_score, [3 * e, e, 4 * e])
    with pytest.raises(ValueError, match="rlhf_rewards"):
        L.rlhf_rewards(score[:1], kl[:1], torch.zeros(1, 5), 0.1)


# ---------------------------------------------------------------------------------------------------------
# advantages


def test_gae_1x3_step_by_step():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3;              A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03;           A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04;           A0 = 0.04 + 0.72*0.246 = 0.21712
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    assert close(adv, [[0.21712, 0.246, 0.3]])
    assert close(ret, [[0.71712, 0.846, 1.0]])


def test_gae_trailing_pad_is_terminal():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.6, 99.0], [7.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0: pad at the end; row 1: a prompt token first
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: value 99 and reward 5 are ignored; t=1: delta = 1 + 0 - 0.6 = 0.4; t=0: 0.04 + 0.72*0.4 = 0.328
    # row 1: t=2: delta = 2 - 1 = 1; t=1: delta = 0.9*1 - 1 = -0.1, A1 = -0.1 + 0.72*1 = 0.62; t=0 masked -> 0
    assert close(adv, [[0.328, 0.4, 0.0], [0.0, 0.62, 1.0]])
    assert close(ret, [[0.828, 1.0, 0.0], [0.0, 1.62, 2.0]])


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    torch.manual_seed(7)
    r, v = torch.randn(2, 6), torch.randn(2, 6)
    adv, ret = L.gae(r, v, torch.ones(2, 6), gamma=1.0, lam=1.0)
    togo = r.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, togo, atol=1e-5) and torch.allclose(adv, togo - v, atol=1e-5)


def test_grpo_advantages_hand_values():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1])  # (N*G,), G = 3
    adv = L.grpo_advantages(rewards, group_size=3, eps=0.0)
    # group [1,2,3]: mean 2, unbiased std 1 -> [-1, 0, 1]; all-equal groups -> exactly 0
    assert adv.shape == (9,)
    assert close(adv, [-1.0, 0.0, 1.0, 0, 0, 0, 0, 0, 0])
    assert (adv[3:] == 0).all()
    # (N, G) input, G = 2: [0, 1] -> mean 0.5, unbiased std sqrt(0.5) -> -+0.5/0.70710678 = -+0.70710678
    adv2 = L.grpo_advantages(torch.tensor([[0.0, 1.0]]), group_size=2, eps=0.0)
    assert close(adv2, [-math.sqrt(0.5), math.sqrt(0.5)])
    # eps enters the denominator: 1 / (1 + 1)
    assert close(L.grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, eps=1.0), [-0.5, 0.0, 0.5])
    # scale=False: r - mean only
    assert close(L.grpo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3, scale=False), [-2.0, -1.0, 3.0])
    with pytest.raises(ValueError, match="grpo_advantages"):
        L.grpo_advantages(torch.zeros(5), group_size=2)


def test_rloo_advantages_hand_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # 1 - (2+3)/2 = -1.5; 2 - (1+3)/2 = 0; 3 - (1+2)/2 = 1.5
    assert close(L.rloo_advantages(rewards), [[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]])
    # [0, 0, 0, 4]: 0 - 4/3 three times, 4 - 0
    assert close(L.rloo_advantages(torch.tensor([[0.0, 0.0, 0.0, 4.0]])), [[-4 / 3, -4 / 3, -4 / 3, 4.0]])
    with pytest.raises(ValueError, match="rloo"):
        L.rloo_advantages(torch.tensor([[1.0]]))


# ---------------------------------------------------------------------------------------------------------
# PPO


def test_ppo_policy_loss_clipping_cases():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # last token is padding: must not count
    old = torch.zeros(1, 5)
    logp = ratio.log().requires_grad_(True)
    loss, stats = L.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)):
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8 (clipped)
    #   r=1.5, A=-1: max( 1.5,  1.2) =  1.5
    assert close(loss, (-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert close(stats["clipfrac"], 0.5)
    # approx_kl (k3) = mean of r - 1 - ln r: 2 * (0.5 - ln 1.5) + 2 * (-0.5 + ln 2), over 4
    k3 = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2.0))) / 4
    assert close(stats["approx_kl"], k3)
    assert close(stats["ratio"], 1.0)
    # gradient: 0 on clipped tokens and padding; d(-A r)/dlogp = -A r, over 4 tokens
    loss.backward()
    assert close(logp.grad, [[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]])


def test_ppo_policy_loss_token_vs_sequence_reduction():
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 50.0, 50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logp = torch.zeros(2, 3)  # ratio 1: loss per token = -A
    tok, stats = L.ppo_policy_loss(logp, logp, adv, mask, reduction="token")
    seq, _ = L.ppo_policy_loss(logp, logp, adv, mask, reduction="sequence")
    assert close(tok, -(1 + 2 + 3 + 6) / 4)  # -3
    assert close(seq, -((1 + 2 + 3) / 3 + 6) / 2)  # -4
    assert close(stats["clipfrac"], 0.0) and close(stats["approx_kl"], 0.0)
    with pytest.raises(ValueError, match="reduction"):
        L.ppo_policy_loss(logp, logp, adv, mask, reduction="batch")


def test_ppo_value_loss_clipping_cases():
    old = torch.zeros(1, 5)
    values = torch.tensor([[0.5, 0.5, 0.1, -0.5, 9.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = L.ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # v=0.5,R=1: max(0.25, (0.2-1)^2=0.64) = 0.64 (clipped)
    # v=0.5,R=0: max(0.25, 0.04) = 0.25
    # v=0.1,R=1: inside the clip range, both 0.81 (not counted as clipped)
    # v=-0.5,R=-1: max(0.25, (-0.2+1)^2=0.64) = 0.64 (clipped)
    assert close(loss, 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4)
    assert close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    # grad = 0.5 * 2 (v - R) / 4 on unclipped winners, 0 where the clipped term wins or padding
    assert close(values.grad, [[0.0, 0.5 / 4, -0.9 / 4, 0.0, 0.0]])


def test_ppo_loss_sum_reductions_are_the_means_times_their_counts():
    """token_sum = token mean x masked tokens; sequence_sum = sequence mean x rows; value sum = mean x tokens
    (hand-computed: ratio 1, so the policy loss per token is -A)."""
    adv = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 3)
    tok_sum, _ = L.ppo_policy_loss(logp, logp, adv, mask, reduction="token_sum")
    seq_sum, _ = L.ppo_policy_loss(logp, logp, adv, mask, reduction="sequence_sum")
    assert close(tok_sum, -6.0) and close(seq_sum, -(1.5 + 3.0))
    assert close(L.ppo_policy_loss(logp, logp, adv, mask)[0], -2.0)  # the token mean: -6 / 3
    values, returns = torch.tensor([[1.0, 1.0, 9.0], [0.0, 9.0, 9.0]]), torch.tensor([[2.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    v_sum, _ = L.ppo_value_loss(values, values, returns, mask, clip_eps=10.0, reduction="sum")
    assert close(v_sum, 0.5 * (1 + 4 + 4))  # squared errors 1, 4, 4 on the 3 masked tokens
    with pytest.raises(ValueError, match="reduction"):
        L.ppo_policy_loss(logp, logp, adv, mask, reduction="mean")


def test_shape_mismatch_errors_name_the_function():
    with pytest.raises(ValueError, match="gae"):
        L.gae(torch.zeros(1, 3), torch.zeros(1, 4), torch.ones(1, 3))
    with pytest.raises(ValueError, match="bradley_terry"):
        L.bradley_terry(torch.zeros(2), torch.zeros(3))


def test_entropy_in_chunks_equals_the_unchunked_formula():
    """Chunked over (B*T) rows (fp32 copies of chunk_size x V, never the whole (B, T, V)): every chunk size gives
    the one-shot logsumexp(z) - sum softmax(z) * z, also for bf16 logits and a chunk that does not divide B*T."""
    import unittest.mock as mock

    torch.manual_seed(3)
    logits = torch.randn(3, 5, 11) * 4
    z = logits / 0.7
    full = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)  # (3, 5): the unchunked formula
    for chunk in (1, 4, 15, 1000):
        got = L.entropy_from_logits(logits, temperature=0.7, chunk_size=chunk)
        assert got.shape == (3, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    half = logits.to(torch.bfloat16)
    zh = half.float() / 0.7
    torch.testing.assert_close(L.entropy_from_logits(half, 0.7, chunk_size=4),
                               torch.logsumexp(zh, -1) - (torch.softmax(zh, -1) * zh).sum(-1), rtol=1e-5, atol=1e-5)
    seen, real_logsumexp = [], torch.logsumexp

    def spy(x, dim):
        seen.append(tuple(x.shape))
        return real_logsumexp(x, dim)

    with mock.patch.object(L.torch, "logsumexp", spy):
        L.entropy_from_logits(logits, chunk_size=4)
    assert seen and all(s[0] <= 4 and len(s) == 2 for s in seen)  # (<= 4, V) pieces, never (B, T, V)


def test_grpo_eps_keeps_near_tied_groups_small():
    """Default eps 1e-4 (TRL's): a group tied but for a 2**-20 rounding difference gets advantages below 1e-2, not
    the 0.48 that a 1e-6 eps makes of it; a well-spread group moves by 1e-4 relative only."""
    near = torch.tensor([1.0, 1.0 + 2**-20, 1.0, 1.0])  # unbiased std = 2**-21 (about 4.8e-7)
    std = near.std().item()
    adv = L.grpo_advantages(near, 4)
    # by hand: the odd one out is 0.75 * 2**-20 above the mean -> 7.15e-7 / (4.8e-7 + 1e-4) = 7.1e-3
    assert adv[1].item() == pytest.approx(0.75 * 2**-20 / (std + 1e-4), rel=1e-5)
    assert adv.abs().max().item() < 0.01
    assert L.grpo_advantages(near, 4, eps=1e-6).abs().max().item() > 0.4  # the old eps: 0.48, a tie blown up
    spread = torch.tensor([0.0, 1.0, 2.0])  # std 1
    torch.testing.assert_close(L.grpo_advantages(spread, 3), torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
