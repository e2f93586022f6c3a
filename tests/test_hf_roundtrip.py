"""Native model directories load in transformers with equal logits/scores, and back in chatforge."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarModel, gather_last
from chatforge.model.hf import (ModelDirError, NotNativeModelError, llama_config, load_model,
                                model_config_from_hf, save_model)

V = 300
SPECIAL = {"pad_id": 1, "bos_id": 0, "eos_id": 0, "end_id": 6}


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, rope_theta=500.0, norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


def make_gpt(cfg, std=0.1, seed=0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg, V)
    m.init_weights(std)
    for p in m.parameters():  # non-trivial norm weights, so a missed norm would show
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    return m.eval()


def batch(pad_side: str):
    """Rows of different lengths (no pad id inside), padded on ``pad_side`` -> (idx, mask)."""
    torch.manual_seed(3)
    rows = [torch.randint(2, V, (n,)).tolist() for n in (11, 5, 8)]
    T = max(map(len, rows))
    idx = torch.full((3, T), SPECIAL["pad_id"], dtype=torch.long)
    mask = torch.zeros((3, T), dtype=torch.long)
    for i, r in enumerate(rows):
        s = slice(T - len(r), T) if pad_side == "left" else slice(0, len(r))
        idx[i, s], mask[i, s] = torch.tensor(r), 1
    return idx, mask


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_causal_lm_with_equal_logits(tmp_path, tie):
    cfg = tiny(tie_embeddings=tie)
    m = make_gpt(cfg)
    save_model(m, tmp_path, cfg, V, SPECIAL, generation={"max_new_tokens": 32})
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto).__name__ == "LlamaForCausalLM"
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    x = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=1e-4, rtol=0)
        idx, mask = batch("right")  # right padding: HF positions are arange, ours cumsum - 1: equal at real tokens
        ours, theirs = m(idx, mask), hf(idx, attention_mask=mask).logits
        torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-4, rtol=0)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [6, 0] and gen["pad_token_id"] == 1 and gen["max_new_tokens"] == 32
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_transformers_sequence_classifier_scores_equal(tmp_path, pad_side):
    cfg = tiny()
    rm = ScalarModel.from_trunk(make_gpt(cfg))
    save_model(rm, tmp_path, cfg, V, SPECIAL)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"] and hf_cfg["num_labels"] == 1
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 1
    idx, mask = batch(pad_side)
    with torch.no_grad():
        theirs = hf(idx, attention_mask=mask).logits.squeeze(-1)  # (B,)
    ours = gather_last(rm(idx, mask), mask)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert ours.std() > 1e-3  # rows differ: a real comparison


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_load_model_round_trip(tmp_path, kind):
    cfg = tiny(tie_embeddings=kind == "causal", n_kv_head=None, dropout=0.1)
    m = make_gpt(cfg)
    if kind == "reward":
        m = ScalarModel.from_trunk(m)
    save_model(m, tmp_path, cfg, V, SPECIAL)
    loaded, cfg2 = load_model(tmp_path)
    assert type(loaded) is type(m) and not loaded.training
    assert cfg2.init == str(tmp_path)
    cfg2.init = None
    assert cfg2 == cfg  # every field survives, intermediate_size=None included
    m.eval()
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(loaded(x), m(x), atol=0, rtol=0)
    if kind == "causal":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_save_is_atomic_per_file_and_keeps_other_files(tmp_path):
    cfg = tiny()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_text("x")
    save_model(make_gpt(cfg), tmp_path, cfg, V, SPECIAL)
    save_model(make_gpt(cfg, seed=1), tmp_path, cfg, V, SPECIAL)  # overwrite in place
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint", "config.json", "generation_config.json", "metrics.jsonl", "model.safetensors"]
    assert (tmp_path / "checkpoint" / "state.pt").read_text() == "x"
    loaded, _ = load_model(tmp_path)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, make_gpt(cfg, seed=1).model.embed_tokens.weight)


def test_native_loads_a_directory_written_by_transformers(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                      rope_theta=1234.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    m, cfg = load_model(tmp_path)
    assert (cfg.n_kv_head, cfg.intermediate_size, cfg.rope_theta) == (1, 96, 1234.0)
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-4, rtol=0)


def test_bad_directories_give_clear_errors(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelDirError, match=r"no config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="invalid JSON at line 1"):
        load_model(tmp_path)
    cfg = tiny()
    (tmp_path / "config.json").write_text(json.dumps(llama_config(cfg, V, pad_id=1, bos_id=0, eos_id=0)))
    with pytest.raises(ModelDirError, match=r"no model\.safetensors") as e:
        load_model(tmp_path)
    assert str(tmp_path) in str(e.value)
    qwen = dict(llama_config(cfg, V, pad_id=1, bos_id=0, eos_id=0), model_type="qwen2",
                architectures=["Qwen2ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    with pytest.raises(NotNativeModelError, match="wrapper path") as e:
        load_model(tmp_path)
    assert "Qwen2ForCausalLM" in str(e.value)
    with pytest.raises(NotNativeModelError, match="biases"):
        model_config_from_hf(dict(llama_config(cfg, V, pad_id=1, bos_id=0, eos_id=0), attention_bias=True))
    # weights that do not match the config
    save_model(make_gpt(cfg), tmp_path, cfg, V, SPECIAL)
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["hidden_size"], bad["head_dim"] = 128, 32
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelDirError, match="do not match config.json"):
        load_model(tmp_path)


def test_reward_config_requires_pad_id():
    with pytest.raises(ValueError, match="pad_id"):
        llama_config(tiny(), V, pad_id=None, bos_id=0, eos_id=0, kind="reward")
