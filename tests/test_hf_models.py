"""Hugging Face models of three families (Llama, Qwen2, GPT-2) through chatforge: equal logits, equal greedy
generation, directories that load back in transformers, the add-chat-tokens path, LoRA, and clear errors.

Every model is a tiny, randomly initialised one built locally from its transformers config (no downloads).
"""

import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from chatforge.config import LoraConfig
from chatforge.engine import Engine
from chatforge.model.gpt import GPT
from chatforge.model.heads import gather_last
from chatforge.model.hf import ModelDirError
from chatforge.model.hf_causal import HFCausalLM, HFScalarModel, NoRewardHeadError
from chatforge.model.hf_tokenizer import TokenizerDirError
from chatforge.model.load import load_causal_lm, load_scalar_model, scalar_from_causal
from chatforge.model.lora import (LoraReference, adapters_disabled, apply_lora, has_lora, reference_from,
                                  shares_base)
from chatforge.model.save import save_model_dir
from chatforge.tokenizer import SPECIAL_TOKENS, render_conversation, render_prompt, train_tokenizer

FAMILIES = ["llama", "qwen2", "gpt2"]
TEXT = ["the quick brown fox jumps over the lazy dog. ", "hello world, how are you today? ",
        "a small model learns to count: one two three four five. "] * 30
ATOL = 1e-5


def hf_config(family: str, vocab_size: int):
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "llama":
        return T.LlamaConfig(**shape, rms_norm_eps=1e-6)
    if family == "qwen2":
        return T.Qwen2Config(**shape)  # q/k/v biases: runs through the transformers wrapper
    return T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)


def build_model(family: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_config(family, vocab_size))
    with torch.no_grad():  # larger weights: peaked, varied next-token distributions
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def chat_tok():
    return train_tokenizer(TEXT, 320)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, chat_tok):
    """family -> a transformers model directory with chatforge's tokenizer."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(fam)
        build_model(fam, chat_tok.vocab_size).save_pretrained(d)
        chat_tok.save(d)
        out[fam] = d
    return out


def plain_gpt2_tokenizer(path):
    """A GPT-2-style byte-level BPE whose only special token is <|endoftext|> (no chat tokens, no template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def padded(rows, pad_id):
    """Left-pad rows -> (idx, mask) (B, T)."""
    L = max(map(len, rows))
    idx = torch.full((len(rows), L), pad_id)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    return idx, mask


def prompts(tok):
    return [render_prompt(tok, [{"role": "user", "content": c}]) for c in ("hello world", "the quick brown fox", "one")]


# ------------------------------------------------------------------------------------ equal logits


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_logits_equal_transformers(model_dirs, family):
    m, cfg, tok = load_causal_lm(model_dirs[family])
    assert isinstance(m, GPT if family == "llama" else HFCausalLM)  # Llama shapes take the native fast path
    assert cfg.init == str(model_dirs[family]) and cfg.block_size == 64
    hf = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    torch.manual_seed(1)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    rows = prompts(tok)
    idx, mask = padded(rows, tok.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=ATOL, rtol=0)
        ours = m(idx, attention_mask=mask)  # left-padded: each row equals its unpadded forward
        for i, r in enumerate(rows):
            theirs = hf(torch.tensor([r])).logits[0]
            torch.testing.assert_close(ours[i, -len(r):], theirs, atol=ATOL, rtol=0)
        assert torch.isfinite(ours).all()
    assert ours.std() > 0.1  # a real comparison


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_equals_transformers_generate(model_dirs, family):
    m, _, tok = load_causal_lm(model_dirs[family])
    hf = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()
    rows = prompts(tok)
    res = Engine(m).generate(rows, 12, temperature=0.0, pad_id=tok.pad_id)  # one left-padded batch
    for r, toks in zip(rows, res.tokens):
        ref = hf.generate(torch.tensor([r]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_id, attention_mask=torch.ones(1, len(r), dtype=torch.long))
        assert toks == ref[0, len(r):].tolist()
    assert len({tuple(t) for t in res.tokens}) == 3 and any(len(set(t)) > 2 for t in res.tokens)


# ------------------------------------------------------------------------------------ written directories


@pytest.mark.parametrize("family", FAMILIES)
def test_written_directories_load_in_transformers(model_dirs, family, tmp_path):
    m, cfg, tok = load_causal_lm(model_dirs[family])
    with torch.no_grad():  # a change, so that the test sees what was written
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_model_dir(m, tmp_path / "sft", cfg, tok, generation={"max_new_tokens": 7})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    x = torch.randint(0, tok.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=ATOL, rtol=0)
    gen = json.loads((tmp_path / "sft" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.end_id, tok.eot_id] and gen["pad_token_id"] == tok.pad_id
    assert gen["max_new_tokens"] == 7
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "sft")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] == \
        render_conversation(tok, msgs)[0]
    m2, _, _ = load_causal_lm(tmp_path / "sft")  # and back into chatforge
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x), atol=ATOL, rtol=0)

    rm = scalar_from_causal(m)
    assert isinstance(rm, HFScalarModel if family != "llama" else torch.nn.Module)
    save_model_dir(rm, tmp_path / "rm", cfg, tok)
    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(seq).__name__.endswith("ForSequenceClassification") and seq.config.pad_token_id == tok.pad_id
    idx, mask = padded(prompts(tok), tok.pad_id)
    for side in ("left", "right"):
        if side == "right":  # right padding: transformers reads the last non-pad token
            idx, mask = idx.clone(), mask.clone()
            for i in range(len(idx)):
                n = int(mask[i].sum())
                idx[i] = torch.cat([idx[i, -n:], torch.full((len(idx[i]) - n,), tok.pad_id)])
                mask[i] = torch.cat([torch.ones(n), torch.zeros(len(mask[i]) - n)]).long()
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # GPT-2's absolute positions: number the real tokens from 0
        with torch.no_grad():
            ours = gather_last(rm(idx, mask), mask)
            theirs = seq(idx, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
            torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert ours.std() > 1e-3
    rm2, _, _ = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(rm2(idx, mask), rm(idx, mask), atol=ATOL, rtol=0)


def test_tokenizer_without_chat_tokens_gets_them_added(tmp_path):
    plain = plain_gpt2_tokenizer(tmp_path / "gpt2")
    V0 = len(plain)
    hf = build_model("gpt2", V0)
    hf.save_pretrained(tmp_path / "gpt2")
    m, cfg, tok = load_causal_lm(tmp_path / "gpt2")
    assert tok.vocab_size == V0 + 5 and m.vocab_size == V0 + 5  # <|endoftext|> was there already
    assert tok.eot_id == plain.convert_tokens_to_ids("<|endoftext|>")
    new = [tok.pad_id, tok.system_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert new == list(range(V0, V0 + 5))
    emb = m.hf.get_input_embeddings().weight
    mean = hf.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(emb[new], mean.expand(5, -1), atol=1e-6, rtol=0)  # new rows = mean embedding
    x = torch.randint(0, V0, (2, 9))
    with torch.no_grad():  # the original vocabulary computes exactly as before
        torch.testing.assert_close(m(x)[..., :V0], hf(x).logits, atol=ATOL, rtol=0)
    ids, mask = render_conversation(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    assert ids[0] == tok.bos_id and tok.end_id in ids and sum(mask) == len(tok.encode("ok")) + 1
    save_model_dir(m, tmp_path / "out", cfg, tok)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.vocab_size == V0 + 5 and back.config.pad_token_id == tok.pad_id
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert all(t in hf_tok.get_vocab() for t in SPECIAL_TOKENS)
    _, _, tok2 = load_causal_lm(tmp_path / "out")  # nothing added the second time
    assert tok2.vocab_size == tok.vocab_size


def test_a_model_with_its_own_chat_template_is_told_which_format_trains(tmp_path, caplog):
    fast = plain_gpt2_tokenizer(tmp_path)
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(tmp_path)
    build_model("gpt2", len(fast)).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="chatforge.model"):
        _, _, tok = load_causal_lm(tmp_path)
    assert "brings its own chat template" in caplog.text and str(tmp_path) in caplog.text
    assert tok.end_id == len(fast) + 4  # chatforge's format with the added tokens


# ------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_adapters_only_and_merges_on_save(model_dirs, family, tmp_path):
    m, cfg, tok = load_causal_lm(model_dirs[family])
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    x = torch.randint(0, tok.vocab_size, (2, 10))
    with torch.no_grad():
        before = m(x)
    apply_lora(m, LoraConfig(r=4, alpha=8.0, target_modules=targets))
    ref = reference_from(m)
    assert has_lora(m) and shares_base(m) and isinstance(ref, LoraReference)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(m(x), before, atol=ATOL, rtol=0)  # lora_B = 0 at the start
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    with torch.no_grad():
        after = m(x)
        assert (after - before).abs().max() > 1e-3  # the adapters learnt something
        torch.testing.assert_close(ref(x), before, atol=ATOL, rtol=0)  # the reference is still the base
        with adapters_disabled(m):
            torch.testing.assert_close(m(x), before, atol=ATOL, rtol=0)
        torch.testing.assert_close(m(x), after, atol=0, rtol=0)  # adapters back on
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)
    ref.requires_grad_(False).eval().to("cpu")  # no effect on the policy
    assert all(p.requires_grad for n, p in m.named_parameters() if "lora_" in n)

    save_model_dir(m, tmp_path / "merged", cfg, tok)  # lora.merge defaults to True: a plain HF directory
    assert not (tmp_path / "merged" / "adapter").exists()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, after, atol=1e-4, rtol=0)
    assert has_lora(m)  # the live model keeps training

    m.lora_config = LoraConfig(r=4, alpha=8.0, target_modules=targets, merge=False)
    save_model_dir(m, tmp_path / "unmerged", cfg, tok)  # base weights + adapter/ (peft format)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "unmerged").eval()
    with torch.no_grad():
        torch.testing.assert_close(base(x).logits, before, atol=ATOL, rtol=0)
    import peft

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "unmerged" / "adapter").eval()
    m3, _, _ = load_causal_lm(tmp_path / "unmerged")  # chatforge merges the adapter back on load
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, after, atol=1e-4, rtol=0)
        torch.testing.assert_close(m3(x), after, atol=1e-4, rtol=0)
    assert not has_lora(m3)


def test_lora_on_reward_model_trains_score_and_keeps_base_frozen(model_dirs, tmp_path):
    m, cfg, tok = load_causal_lm(model_dirs["qwen2"])
    rm = apply_lora(scalar_from_causal(m), LoraConfig(r=2, target_modules=["all-linear"]))
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "hf.score.weight" in trainable and all("lora_" in n or "score" in n for n in trainable)
    assert not shares_base(rm)  # the score head trains: the base is not the whole model
    apply_lora(m, LoraConfig(r=2))
    critic = scalar_from_causal(m, score_std=0.0)  # from a LoRA policy: its merged trunk, no adapters
    assert not has_lora(critic) and has_lora(m)
    x = torch.randint(0, tok.vocab_size, (1, 6))
    with torch.no_grad():
        assert critic(x).abs().max() == 0  # zero score head (PPO critic)
        torch.testing.assert_close(critic.model(x).last_hidden_state, m.model(x).last_hidden_state, atol=ATOL, rtol=0)


def test_lora_with_added_chat_tokens_trains_embeddings_and_copies_reference(tmp_path):
    plain_gpt2_tokenizer(tmp_path)
    build_model("gpt2", 300).save_pretrained(tmp_path)
    m, _, tok = load_causal_lm(tmp_path)
    apply_lora(m, LoraConfig(r=2, target_modules=["c_attn"]))
    assert m.hf.get_input_embeddings().weight.requires_grad  # new rows start equal: they must learn
    ref = reference_from(m)
    assert not isinstance(ref, LoraReference) and not has_lora(ref)  # the base is not the start: a frozen copy
    assert not any(p.requires_grad for p in ref.parameters())


def test_lora_targets_that_do_not_exist_list_the_real_ones(model_dirs):
    m, _, _ = load_causal_lm(model_dirs["gpt2"])
    with pytest.raises(ValueError, match=r"q_proj.*do not exist.*c_attn, c_fc, c_proj") as e:
        apply_lora(m, LoraConfig(r=4))  # the Llama defaults on GPT-2
    assert str(model_dirs["gpt2"]) in str(e.value)
    assert apply_lora(m, LoraConfig(r=0)) is m and not has_lora(m)


# ------------------------------------------------------------------------------------ bad input


def test_bad_directories_give_clear_errors(tmp_path, chat_tok):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelDirError, match=r"not a model directory \(no config\.json\)") as e:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(e.value)

    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ModelDirError, match="transformers cannot read config.json") as e:
        load_causal_lm(d)
    assert str(d) in str(e.value)

    d = tmp_path / "no_tokenizer"  # a real model, no tokenizer files
    build_model("qwen2", 300).save_pretrained(d)
    with pytest.raises(TokenizerDirError, match="no usable tokenizer") as e:
        load_causal_lm(d)
    assert str(d) in str(e.value)

    d = tmp_path / "gpt2"
    build_model("gpt2", chat_tok.vocab_size).save_pretrained(d)
    chat_tok.save(d)
    with pytest.raises(ModelDirError, match="not a reward model"):
        load_scalar_model(d)
    m, _, _ = load_causal_lm(d)
    save_model_dir(scalar_from_causal(m), tmp_path / "rm", m.cfg, chat_tok)
    with pytest.raises(ModelDirError, match="reward model.*not a language model"):
        load_causal_lm(tmp_path / "rm")


def test_architecture_without_sequence_classification_cannot_be_a_reward_model(tmp_path, chat_tok):
    cfg = T.CodeGenConfig(vocab_size=chat_tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                          rotary_dim=8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    chat_tok.save(tmp_path)
    m, _, tok = load_causal_lm(tmp_path)  # fine as a causal LM ...
    res = Engine(m).generate(prompts(tok)[:1], 3, temperature=0.0, pad_id=tok.pad_id)
    assert len(res.tokens[0]) == 3
    with pytest.raises(NoRewardHeadError, match="cannot serve as a reward model") as e:  # ... not as an RM
        scalar_from_causal(m)
    assert str(tmp_path) in str(e.value) and "codegen" in str(e.value)


# ------------------------------------------------------------------------------------ stages on each family


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from chatforge.demo.files import write_world

    return write_world(tmp_path_factory.mktemp("world"), seed=0, corpus_mb=0.01, n_sft=32, n_pairs=32,
                       n_rl_prompts=16, n_eval_prompts=0)


def run_stage(stage: str, init, out, data, *extra: str):
    import importlib

    from chatforge.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(stage, ROOT / "configs" / "micro.yaml", [
        f"model.init={init}", f"data.path=[{data}]", "train.max_steps=2", "train.batch_size=2", "train.eval_every=0",
        "train.ckpt_every=0", "data.val_fraction=0.0", "sft.n_eval_prompts=0", "rm.norm_samples=4",
        "rl.prompts_per_step=2", "rl.max_new_tokens=6", "rl.ppo_epochs=1", *extra])
    importlib.import_module(f"chatforge.stages.{stage}").run(cfg, out)
    return out


def assert_loads_in_transformers(out, causal: bool = True):
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    hf = auto.from_pretrained(out).eval()
    assert not any("lora" in k for k in hf.state_dict())
    return hf


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_rm_dpo_ppo_steps_on_each_family(model_dirs, world, family, tmp_path):
    """A few steps of each stage from a transformers model directory; every output loads in transformers."""
    init = model_dirs[family]
    sft = run_stage("sft", init, tmp_path / "sft", world["sft"])
    hf = assert_loads_in_transformers(sft)
    m, _, tok = load_causal_lm(sft)
    x = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=ATOL, rtol=0)
        assert (m(x) - AutoModelForCausalLM.from_pretrained(init)(x).logits).abs().max() > 1e-4  # it trained
    rm = run_stage("rm", sft, tmp_path / "rm", world["preferences"])
    assert_loads_in_transformers(rm, causal=False)
    assert_loads_in_transformers(run_stage("dpo", sft, tmp_path / "dpo", world["preferences"]))
    assert_loads_in_transformers(run_stage("ppo", sft, tmp_path / "ppo", world["rl_prompts"],
                                           f"rl.reward_model={rm}"))


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_lora_in_each_stage_only_moves_the_adapted_layers(model_dirs, world, stage, tmp_path):
    """lora.r > 0 with q_proj/v_proj targets: after merging, every other weight equals the starting model's."""
    init = model_dirs["qwen2"]
    data = {"sft": world["sft"], "rm": world["preferences"], "dpo": world["preferences"], "ppo": world["rl_prompts"]}
    extra = ["lora.r=4", "lora.target_modules=[q_proj,v_proj]", "optim.lr=0.05"]
    if stage == "ppo":
        extra.append(f"rl.reward_model={run_stage('rm', init, tmp_path / 'rm0', world['preferences'])}")
    out = run_stage(stage, init, tmp_path / stage, data[stage], *extra)
    start = AutoModelForCausalLM.from_pretrained(init).state_dict()
    got = assert_loads_in_transformers(out, causal=stage != "rm").state_dict()
    moved = {k for k in got if k in start and not torch.equal(got[k], start[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), sorted(moved)


def test_continued_pretraining_of_a_model_without_chat_tokens(world, tmp_path):
    """pretrain --model.init on a GPT-2-family directory whose tokenizer lacks the chat tokens."""
    plain_gpt2_tokenizer(tmp_path / "gpt2")
    build_model("gpt2", 300).save_pretrained(tmp_path / "gpt2")
    out = run_stage("pretrain", tmp_path / "gpt2", tmp_path / "base", world["corpus"], "model.block_size=32")
    hf = assert_loads_in_transformers(out)
    assert hf.config.vocab_size == 305 and type(hf).__name__ == "GPT2LMHeadModel"
    m, _, tok = load_causal_lm(out)
    assert tok.vocab_size == 305 and tok.end_id == 304
    x = torch.randint(0, 305, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=ATOL, rtol=0)
