"""PPO (stage 4): rollout tensors and log-probs, reward placement, KL controller, prompt loading, a learning
run on a micro policy, exact resume and bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from chatforge import losses
from chatforge.config import ConfigError, ModelConfig, load_config
from chatforge.model.gpt import GPT
from chatforge.rl.prompts import PromptLoader, load_prompt_set
from chatforge.rl.stats import final_scores
from chatforge.rl.kl_controller import AdaptiveKLController, FixedKLController, make_kl_controller
from chatforge.rl.timing import PHASE_KEYS
from chatforge.rl.rollout import build_batch, response_logprobs, response_values, sample
from chatforge.stages import ppo
from chatforge.trainer import Interrupted
from tests.rl_fixtures import (  # noqa: F401  (world, single_thread: fixtures)
    MICRO, comparable, interrupt_at, rl_overrides, single_thread, train_rows, world,
)

END, PAD = 5, 1


def peaky_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64), 300)
    m.init_weights(std=0.3)  # a peaked distribution, so that wrong positions would change the log-probs
    return m.eval()


# ---------------------------------------------------------------------------------------------- rollout maths


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_engine_and_fresh_forward(temperature):
    model = peaky_gpt()
    prompts = [[0, 3, 40, 41, 42, 43, 44, 4], [0, 3, 50, 4], [0, 3, 60, 61, 4]]  # different lengths: left padding
    g = torch.Generator().manual_seed(1)
    s = sample(model, prompts, 12, temperature, END, PAD, g)
    batch = build_batch(prompts, s.response_ids, PAD, END)
    assert batch.input_ids[1, :4].tolist() == [PAD] * 4 and batch.attention_mask[1, :4].sum() == 0
    with torch.no_grad():
        logp, ent = response_logprobs(model, batch, temperature, with_entropy=True)  # (B, R)
    for i, (p, r) in enumerate(zip(prompts, batch.response_ids)):
        n = len(r)
        engine = torch.tensor(s.logprobs[i])  # the sampler's own log-probs
        torch.testing.assert_close(logp[i, :n], engine, atol=2e-5, rtol=1e-5)  # float error grows with |log p|
        assert logp[i, n:].abs().sum() == 0 and ent[i, n:].abs().sum() == 0  # masked after the response
        with torch.no_grad():  # a fresh forward of this row alone, no padding at all
            ids = torch.tensor([p + r])
            fresh = losses.token_logprobs(model(ids)[:, len(p) - 1:-1], ids[:, len(p):], temperature)[0]
        torch.testing.assert_close(logp[i, :n], fresh, atol=2e-5, rtol=0)
    # a temperature mismatch would show: the T=1 log-probs of a T=0.7 sample differ
    if temperature != 1.0:
        with torch.no_grad():
            other, _ = response_logprobs(model, batch, 1.0)
        assert (other - logp).abs().max() > 1e-2
    # trimmed sub-batches (micro-batches) give the same numbers
    sub = batch.select(torch.tensor([1, 2]))
    with torch.no_grad():
        logp_sub, _ = response_logprobs(model, sub, temperature)
    torch.testing.assert_close(logp_sub, logp[1:, :logp_sub.shape[1]], atol=2e-5, rtol=0)


def test_tokens_after_end_are_masked_and_missing_eos_detected():
    prompts = [[0, 3, 7, 4], [0, 3, 8, 9, 4]]
    responses = [[20, 21, END, 22, 23], [30, 31, 32]]  # row 0: text after <|end|>; row 1 never ends
    b = build_batch(prompts, responses, PAD, END)
    assert b.response_ids == [[20, 21, END], [30, 31, 32]]
    assert b.finished.tolist() == [True, False]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    P = b.prompt_len
    assert P == 5 and b.input_ids[0].tolist() == [PAD, 0, 3, 7, 4, 20, 21, END]
    assert b.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    b2 = build_batch(prompts, [[20, END], [30, 31, 32, 33, END, 1, 1]], PAD, END)
    assert b2.response_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b2.attention_mask[0, P + 2:].sum() == 0  # right padding after <|end|> is not attended to
    with pytest.raises(ValueError, match="empty response"):
        build_batch([[0, 3, 4]], [[]], PAD, END)


def test_reward_on_last_response_token_and_missing_eos_penalty():
    b = build_batch([[0, 3, 7, 4], [0, 3, 4]], [[20, 21, END], [30, 31, 32, 33]], PAD, END)
    rl = SimpleNamespace(reward_clip=None, missing_eos_penalty=-1.0, missing_eos_mode="replace")
    norm = torch.tensor([0.5, 0.7])
    score = final_scores(norm, b.finished, rl)
    assert score.tolist() == [0.5, -1.0]  # row 1 never ended: in 'replace' mode the penalty replaces its 0.7
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.1, 0.1, 0.1, 0.1]]) * b.response_mask  # (B, R)
    rewards, non_score = losses.rlhf_rewards(score, kl, b.response_mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 0.5, 0.0], [-0.05, -0.05, -0.05, -0.05 - 1.0]])
    torch.testing.assert_close(rewards, expected)  # the score sits on <|end|> (row 0) / the last token (row 1)
    torch.testing.assert_close(non_score, torch.tensor([-0.3, -0.2]))
    clipped = final_scores(torch.tensor([3.0, -5.0]), torch.tensor([True, True]),
                           SimpleNamespace(reward_clip=2.0, missing_eos_penalty=-1.0))
    assert clipped.tolist() == [2.0, -2.0]
    off = final_scores(norm, b.finished, SimpleNamespace(reward_clip=None, missing_eos_penalty=None))
    torch.testing.assert_close(off, norm)


def test_missing_eos_penalty_subtracts_by_default_and_keeps_the_ordering():
    """Default (TRL's): an unfinished response scores its reward minus |penalty|, never more than the same response
    finished; 'replace' gives the penalty itself, so a finished answer scored below it loses to any unfinished one."""
    from chatforge.config import RLConfig, load_config

    rl = RLConfig()
    assert rl.missing_eos_mode == "subtract" and rl.missing_eos_penalty == -1.0
    norm = torch.tensor([-3.0, -0.5, 0.0, 0.8, 2.5, 7.0])  # normalised rewards, some beyond +-1
    done, never = final_scores(norm, torch.ones(6, dtype=torch.bool), rl), final_scores(norm, torch.zeros(6, dtype=torch.bool), rl)
    torch.testing.assert_close(done, norm)
    torch.testing.assert_close(never, norm - 1.0)  # the penalty is subtracted: 1 less than finished, always
    assert (never < done).all()
    clipped = final_scores(norm, torch.zeros(6, dtype=torch.bool), RLConfig(reward_clip=2.0))
    assert (clipped < final_scores(norm, torch.ones(6, dtype=torch.bool), RLConfig(reward_clip=2.0))).all()  # clip, then subtract
    # a finished answer scored low (-2) vs an unfinished one scored high (+1.5), on the normalised scale
    pair, fin = torch.tensor([-2.0, 1.5]), torch.tensor([True, False])
    assert final_scores(pair, fin, rl).tolist() == [-2.0, 0.5]  # subtract: the better answer keeps its lead, minus 1
    replaced = final_scores(pair, fin, RLConfig(missing_eos_mode="replace"))
    assert replaced.tolist() == [-2.0, -1.0]  # replace: -1 whatever it said, which still beats the finished -2
    same = final_scores(torch.tensor([-2.0, -2.0]), fin, RLConfig(missing_eos_mode="replace"))
    assert same[1] > same[0]  # replace: the same answer scores MORE for never ending (why it is not the default)
    with pytest.raises(ConfigError, match="missing_eos_penalty"):  # a positive value would reward never ending
        load_config("ppo", None, ["rl.missing_eos_penalty=1.0"])
    assert load_config("ppo", None, ["rl.missing_eos_penalty=1.0", "rl.missing_eos_mode=replace"]).rl.missing_eos_penalty == 1.0


def test_critic_values_are_read_before_each_response_token():
    from chatforge.model.load import scalar_from_causal

    critic = scalar_from_causal(peaky_gpt(), score_std=0.5).eval()
    b = build_batch([[0, 3, 7, 8, 4], [0, 3, 4]], [[20, END], [30, 31, 32]], PAD, END)
    with torch.no_grad():
        v = response_values(critic, b)  # (B, R)
        full = critic(torch.tensor([[0, 3, 4, 30, 31, 32]]))[0]  # row 1 unpadded
    torch.testing.assert_close(v[1], full[2:5], atol=1e-5, rtol=0)  # V(state before token j) at position P+j-1
    assert v[0, 2] == 0  # past the response


# ---------------------------------------------------------------------------------------------- KL controller


def test_kl_controllers_against_hand_computed_updates():
    fixed = make_kl_controller(0.05, None, 100)
    assert isinstance(fixed, FixedKLController) and fixed.update(100.0, 64) == 0.05
    c = make_kl_controller(0.1, 6.0, 10000)
    assert isinstance(c, AdaptiveKLController)
    # KL 9 > target: error = clip(9/6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 64 / 10000
    assert math.isclose(c.update(9.0, 64), 0.1 * 1.00128, rel_tol=1e-12)
    b1 = c.value
    # KL 3 < target: error = clip(-0.5) = -0.2
    assert math.isclose(c.update(3.0, 64), b1 * (1 - 0.00128), rel_tol=1e-12)
    b2 = c.value
    # KL 6.6: error = 0.1 (inside the clip)
    assert math.isclose(c.update(6.6, 100), b2 * (1 + 0.1 * 100 / 10000), rel_tol=1e-12)
    d = AdaptiveKLController(1.0, 6.0, 10000)
    d.load_state_dict(c.state_dict())
    assert d.value == c.value and d.update(7.0, 8) == c.update(7.0, 8)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 100)


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_loader_world_size_invariant_and_resumable():
    one = PromptLoader(50, 4, seed=3)
    r0, r1 = PromptLoader(50, 2, seed=3, rank=0, world_size=2), PromptLoader(50, 2, seed=3, rank=1, world_size=2)
    for _ in range(20):  # crosses epochs (12 batches per epoch)
        assert one.next() == r0.next() + r1.next()
    state = one.state_dict()
    nxt = [one.next() for _ in range(5)]
    again = PromptLoader(50, 4, seed=3)
    again.load_state_dict(state)
    assert [again.next() for _ in range(5)] == nxt


def test_overlong_prompts_are_counted_skips(tmp_path, world):
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(world["policy"])
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps("Name a colour.") + "\n" + json.dumps({"prompt": "word " * 80}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}) + "\n")
    cfg = load_config("ppo", MICRO, [f"data.path=[{f}]", "rl.max_new_tokens=24"])
    ps = load_prompt_set(cfg, tok, 64, log=False)
    assert ps.skipped_long == 1 and len(ps.ids) == 2 and ps.texts == ["Name a colour.", "Hi"]
    assert all(p[-1] == tok.assistant_id and len(p) <= 64 - 24 for p in ps.ids)


# ---------------------------------------------------------------------------------------------- stage runs


def test_ppo_raises_reward_with_bounded_kl(tmp_path, world):
    """The 'e'-share reward rises clearly within 20 PPO steps; KL to the reference stays bounded."""
    out = tmp_path / "ppo"
    ppo.run(load_config("ppo", MICRO, rl_overrides(world, 20, "rl.missing_eos_penalty=null", "rl.kl_coef=0.01",
                                                   "rl.max_new_tokens=24", "rl.prompts_per_step=16")), out)
    rows = train_rows(out)
    assert len(rows) == 20
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    print(f"ppo micro: reward {first:.3f} -> {last:.3f}, kl {rows[-1]['kl']:.2f}")
    assert last > first + 0.03, (first, last)
    assert all(math.isfinite(r["kl"]) and r["kl"] < 25 for r in rows)  # measured ~5-12 nats at beta 0.01
    for key in ("reward_raw", "non_score_reward", "entropy", "response_length", "eos_fraction", "clipfrac",
                "approx_kl", "policy_loss", "value_loss", "explained_variance", "beta", "grad_norm_actor"):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    assert rows[0]["kl"] == 0.0  # the first rollout is the reference policy itself
    for r in rows:  # where each step's time went (chatforge/rl/timing.py): every phase ran, inside the step
        phases = [r[k] for k in PHASE_KEYS]
        assert all(t >= 0 for t in phases) and sum(phases) <= r["step_s"] + 1e-3, r
    samples = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"samples"' in x]
    assert samples and samples[0]["samples"][0]["response"] is not None
    info = json.loads((out / "chatforge.json").read_text())
    assert info["stage"] == "ppo" and info["metrics"]["first_reward"] == rows[0]["reward"]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_ppo_exact_resume(tmp_path, world, monkeypatch):
    extra = ("rl.prompts_per_step=4", "rl.max_new_tokens=12", "rl.minibatches=2", "rl.ppo_epochs=2",
             "rl.kl_target=1.0", "rl.kl_horizon=100", "train.batch_size=1", "rl.sample_every=2")
    cfg = lambda: load_config("ppo", MICRO, rl_overrides(world, 4, *extra))  # noqa: E731
    ppo.run(cfg(), tmp_path / "full")
    interrupt_at(monkeypatch, 1)  # SIGINT during the 2nd step: checkpoint after it, then Interrupted
    with pytest.raises(Interrupted):
        ppo.run(cfg(), tmp_path / "resumed")
    monkeypatch.undo()
    assert len(train_rows(tmp_path / "resumed")) == 2
    ppo.run(cfg(), tmp_path / "resumed")
    full, resumed = comparable(train_rows(tmp_path / "full")), comparable(train_rows(tmp_path / "resumed"))
    assert len(full) == 4 and full == resumed
    assert len({r["beta"] for r in full}) == 4  # the adaptive controller moved beta every step (and resumed it)


def reward_model_dir(world, tmp_path):
    """(a reward model on the micro policy's trunk, its directory with reward_norm mean 0.25 std 2, tokenizer)."""
    from chatforge.checkpoint import atomic_write_json
    from chatforge.model.hf import save_model
    from chatforge.model.load import load_causal_lm, scalar_from_causal
    from chatforge.model.save import special_ids

    policy, mcfg, tok = load_causal_lm(world["policy"])
    torch.manual_seed(0)
    rm = scalar_from_causal(policy, score_std=None)
    rm_dir = tmp_path / "rm"
    save_model(rm, rm_dir, mcfg, tok.vocab_size, special_ids(tok))
    tok.save(rm_dir)
    atomic_write_json(rm_dir / "chatforge.json", {"stage": "rm", "reward_norm": {"mean": 0.25, "std": 2.0}})
    return rm.eval(), rm_dir, tok


def test_critic_from_the_rm_with_lora_starts_normalised(tmp_path, world):
    """With LoRA adapters on the critic (zero at the start) the folded head still gives (raw - mean) / std."""
    rm, rm_dir, tok = reward_model_dir(world, tmp_path)
    cfg = load_config("ppo", MICRO, rl_overrides(world, 1, f"rl.reward_model={rm_dir}", "rl.reward_fn=null",
                                                 "lora.r=4"))
    critic = ppo.build_critic(cfg, None, torch.device("cpu"), (0.25, 2.0))
    ids = torch.tensor([[tok.bos_id, 40, 41, 42, tok.end_id]])
    with torch.no_grad():
        torch.testing.assert_close(critic(ids), (rm(ids) - 0.25) / 2.0, rtol=1e-5, atol=1e-6)
    assert any("lora" in n for n, _ in critic.named_parameters())


def test_ppo_with_reward_model_critic_starts_from_the_rm(tmp_path, world):
    """--rl.reward_model: the critic is the RM (trunk and head) with its normalisation folded in, so its initial
    values at a sequence's last token equal the normalised rewards (raw - mean) / std that the returns are built
    from; the scores PPO logs are (raw - mean) / std too."""
    from chatforge.model.heads import score_sequences

    rm, rm_dir, tok = reward_model_dir(world, tmp_path)
    seqs = [[tok.bos_id, 40, 41, 42, tok.end_id], [50, 51, tok.end_id], [60, 61, 62]]
    raw = score_sequences(rm.eval(), seqs, tok.pad_id)  # (3,) the reward model's raw scores
    seen = {}
    original = ppo.build_critic

    def spy(cfg, actor, device, reward_norm=None):
        critic = original(cfg, actor, device, reward_norm)
        seen["norm"] = reward_norm
        seen["values"] = score_sequences(critic, seqs, tok.pad_id)  # (3,) the critic's first values, last token
        ids = torch.tensor([[60, 61, 62]])
        seen["per_token"] = (critic(ids)[0].detach(), rm(ids)[0].detach())
        return critic

    ppo.build_critic = spy
    try:
        ppo.run(load_config("ppo", MICRO, rl_overrides(world, 2, f"rl.reward_model={rm_dir}", "rl.reward_fn=null",
                                                       "rl.prompts_per_step=4", "rl.max_new_tokens=12")), tmp_path / "o")
    finally:
        ppo.build_critic = original
    assert seen["norm"] == (0.25, 2.0)
    torch.testing.assert_close(seen["values"], (raw - 0.25) / 2.0, rtol=1e-5, atol=1e-6)
    v, r = seen["per_token"]
    torch.testing.assert_close(v, (r - 0.25) / 2.0, rtol=1e-5, atol=1e-6)  # every position, not only the last
    rows = train_rows(tmp_path / "o")
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    for r in rows:  # reward = normalised raw score
        assert math.isclose(r["reward"], (r["reward_raw"] - 0.25) / 2.0, rel_tol=1e-4, abs_tol=1e-6)


def test_ppo_bad_input_errors(tmp_path, world):
    with pytest.raises(ConfigError, match="exactly one"):
        ppo.run(load_config("ppo", MICRO, rl_overrides(world, 1, "rl.reward_model=/nowhere")), tmp_path / "a")
    with pytest.raises(ConfigError, match="chatforge grpo"):
        ppo.run(load_config("ppo", MICRO, rl_overrides(world, 1, "rl.algo=rloo")), tmp_path / "b")
    with pytest.raises(ValueError, match="non-finite"):
        ppo.run(load_config("ppo", MICRO, rl_overrides(world, 1, "rl.reward_fn=tests.rewards:nan_reward",
                                                       "rl.prompts_per_step=2", "rl.max_new_tokens=4")), tmp_path / "c")
    with pytest.raises(ValueError, match="not a reward model|not a causal|LlamaFor"):
        ppo.run(load_config("ppo", MICRO, rl_overrides(world, 1, f"rl.reward_model={world['policy']}",
                                                       "rl.reward_fn=null")), tmp_path / "d")


def test_ppo_actor_and_critic_have_no_weight_decay_by_default(tmp_path, world, monkeypatch):
    from tests.test_grpo import record_optimizers

    made = record_optimizers(monkeypatch)
    ppo.run(load_config("ppo", MICRO, rl_overrides(world, 1, "rl.prompts_per_step=2", "rl.max_new_tokens=4",
                                                   "rl.ppo_epochs=1", "optim.weight_decay=0.1")), tmp_path / "ppo")
    assert len(made) == 2  # actor, critic
    assert all(g["weight_decay"] == 0.0 for opt in made for g in opt.param_groups)
