"""The OpenAI-compatible API in-process (FastAPI's TestClient): every route, every error, the streaming chunk
format and usage counts. Answers are checked against the engine run directly on the same model directory."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from chatforge.engine import Engine  # noqa: E402
from chatforge.model.load import load_causal_lm  # noqa: E402
from chatforge.rl.reward import RewardModelScorer  # noqa: E402
from chatforge.serve.app import create_app  # noqa: E402
from chatforge.tokenizer import render_prompt  # noqa: E402
from tests.serve_fixtures import REWARD_NORM, build_chat_dir, build_hf_chat_dir, build_reward_dir  # noqa: E402

pytestmark = pytest.mark.timeout(120)
HI = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"chat": build_chat_dir(root), "qwen": build_hf_chat_dir(root), "rm": build_reward_dir(root),
            "rm_raw": build_reward_dir(root, "rm_raw", norm=False)}


@pytest.fixture(scope="module")
def client(dirs):
    app = create_app([str(dirs["chat"]), str(dirs["qwen"]), str(dirs["rm"]), f"raw={dirs['rm_raw']}"])
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def ref(dirs):
    """The chat model loaded on its own, with the engine: what every answer is checked against."""
    model, cfg, tok = load_causal_lm(dirs["chat"])
    return model.eval(), cfg, tok


def engine_answer(ref, messages, n, **kw):
    model, cfg, tok = ref
    prompt = render_prompt(tok, messages)
    res = Engine(model).generate([prompt], n, stop_ids=[tok.end_id, tok.eot_id], **kw)
    ids = res.tokens[0]
    text = tok.decode([t for t in ids if t not in (tok.end_id, tok.eot_id)], skip_special=True)
    return prompt, ids, text, "stop" if res.finished[0] else "length"


def sse(text: str) -> list:
    """The data lines of a server-sent-events body, parsed; the last one must be [DONE]."""
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert all(line.startswith("data: ") or line == "" for line in text.split("\n"))
    return [json.loads(e) for e in events[:-1]]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "chat", "messages": HI, **body})


def assert_error(r, status, code=None, words=()):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    for w in words:
        assert w in err["message"], err["message"]
    return err


# ----------------------------------------------------------------------------- models, health


def test_models_and_health(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [(m["id"], m["kind"], m["context_length"]) for m in data["data"]] == [
        ("chat", "chat", 96), ("qwen", "chat", 96), ("rm", "reward", 96), ("raw", "reward", 96)]
    assert all(m["object"] == "model" and m["owned_by"] == "chatforge" for m in data["data"])
    assert client.get("/v1/models/qwen").json()["id"] == "qwen"
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", ["nope"])
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["chat", "qwen", "rm", "raw"]
    assert set(h["requests"]) == {"chat", "qwen"} and h["requests"]["chat"]["active"] == 0


# ----------------------------------------------------------------------------- chat completions


def test_chat_greedy_equals_the_engine_with_usage(client, ref):
    prompt, ids, text, finish = engine_answer(ref, HI, 30, temperature=0.0)
    r = chat(client, temperature=0, max_tokens=30)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "chat" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == finish and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                             "total_tokens": len(prompt) + len(ids)}
    # max_completion_tokens is the newer name of the same limit
    assert chat(client, temperature=0, max_completion_tokens=30).json()["choices"][0]["message"]["content"] == text


def test_chat_length_limit_stop_string_and_default_max(client, ref):
    _, ids, text, _ = engine_answer(ref, HI, 5, temperature=0.0)
    r = chat(client, temperature=0, max_tokens=5).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    full = engine_answer(ref, HI, 200, temperature=0.0)[2]  # no max_tokens: up to the context
    assert chat(client, temperature=0).json()["choices"][0]["message"]["content"] == full
    stop = full[3:6]
    assert stop and full.index(stop) >= 0
    r = chat(client, temperature=0, stop=[stop, "never appears"]).json()
    assert r["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_chat_n_and_seed_reproduce_the_engine(client, ref):
    r = chat(client, temperature=0.9, top_p=0.95, seed=7, n=3, max_tokens=12).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for i, c in enumerate(r["choices"]):
        want = engine_answer(ref, HI, 12, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(7 + i))
        assert c["message"]["content"] == want[2]
    assert len({c["message"]["content"] for c in r["choices"]}) > 1
    again = chat(client, temperature=0.9, top_p=0.95, seed=7, n=3, max_tokens=12).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in r["choices"]]
    assert r["usage"]["completion_tokens"] == sum(
        len(engine_answer(ref, HI, 12, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(7 + i))[1])
        for i in range(3))


def test_chat_logprobs(client, ref):
    model, _, tok = ref
    prompt, ids, _, _ = engine_answer(ref, HI, 6, temperature=0.0)
    r = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == len(ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0].float(), -1)  # (T, V)
    for j, entry in enumerate(content):
        assert entry["logprob"] == pytest.approx(logp[len(prompt) - 1 + j, ids[j]].item(), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
    plain = [j for j in range(len(ids)) if ids[j] not in tok.special_ids]
    joined = b"".join(bytes(content[j]["bytes"]) for j in plain)  # the bytes of the tokens add up to the text
    assert joined.decode("utf-8", errors="replace") == tok.decode([ids[j] for j in plain])


def test_chat_stream_chunk_format_and_usage(client, ref):
    prompt, ids, text, finish = engine_answer(ref, HI, 25, temperature=0.0)
    r = chat(client, temperature=0, max_tokens=25, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r.text)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body = chunks[1:-1]
    pieces = [c["choices"][0]["delta"]["content"] for c in body if c["choices"][0]["delta"].get("content")]
    assert "".join(pieces) == text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # whole UTF-8 characters only
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert body[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": len(prompt), "completion_tokens": len(ids), "total_tokens": len(prompt) + len(ids)}
    assert len(body) > 3  # streamed in pieces, not as one block
    # without include_usage: no usage field at all
    plain = sse(chat(client, temperature=0, max_tokens=5, stream=True).text)
    assert all("usage" not in c for c in plain)


def test_chat_stream_with_n_interleaves_choices(client):
    chunks = sse(chat(client, temperature=1.0, seed=3, n=2, max_tokens=8, stream=True).text)
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["delta"].get("content", "")
        if ch["finish_reason"]:
            finishes[ch["index"]] = ch["finish_reason"]
    ref = chat(client, temperature=1.0, seed=3, n=2, max_tokens=8).json()["choices"]
    assert texts == {c["index"]: c["message"]["content"] for c in ref}
    assert set(finishes) == {0, 1}


def test_transformers_model_directory(client, dirs):
    model, _, tok = load_causal_lm(dirs["qwen"])
    prompt = render_prompt(tok, HI)
    res = Engine(model.eval()).generate([prompt], 10, temperature=0.0, stop_ids=[tok.end_id, tok.eot_id])
    want = tok.decode([t for t in res.tokens[0] if t not in (tok.end_id, tok.eot_id)], skip_special=True)
    r = client.post("/v1/chat/completions", json={"model": "qwen", "messages": HI, "temperature": 0,
                                                  "max_tokens": 10}).json()
    assert r["choices"][0]["message"]["content"] == want and r["usage"]["completion_tokens"] == len(res.tokens[0])


# ----------------------------------------------------------------------------- completions


def test_completions_echo_logprobs_for_loglikelihood(client, ref):
    model, _, tok = ref
    text = "the quick brown fox"
    r = client.post("/v1/completions", json={"model": "chat", "prompt": text, "max_tokens": 0, "echo": True,
                                             "logprobs": 2}).json()
    (c,) = r["choices"]
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    lp = c["logprobs"]
    assert c["text"] == text and c["finish_reason"] == "length"
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == len(ids) - 1
    assert lp["token_logprobs"] == pytest.approx([logp[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:j])) for j in range(len(lp["tokens"]))]
    assert all(len(d) <= 2 and max(d.values()) >= lp["token_logprobs"][j] - 1e-5
               for j, d in enumerate(lp["top_logprobs"]))
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # token ids are taken as given: the first has no log-prob
    r = client.post("/v1/completions", json={"model": "chat", "prompt": ids, "max_tokens": 0, "echo": True,
                                             "logprobs": 0}).json()
    assert r["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert r["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"], abs=1e-4)


def test_completions_generate_and_stream(client, ref):
    model, _, tok = ref
    ids = [tok.bos_id] + tok.encode("Hello, how")
    res = Engine(model).generate([ids], 8, temperature=0.0, stop_ids=[tok.end_id, tok.eot_id])
    want = tok.decode([t for t in res.tokens[0] if t not in (tok.end_id, tok.eot_id)], skip_special=True)
    body = {"model": "chat", "prompt": ["Hello, how", "the lazy"], "max_tokens": 8, "temperature": 0}
    r = client.post("/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and [c["index"] for c in r["choices"]] == [0, 1]
    assert r["choices"][0]["text"] == want
    assert r["usage"]["prompt_tokens"] == len(ids) + 1 + len(tok.encode("the lazy"))
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()
    assert echoed["choices"][0]["text"] == "Hello, how" + want
    chunks = sse(client.post("/v1/completions", json={**body, "stream": True, "echo": True}).text)
    assert all(c["object"] == "text_completion" for c in chunks)
    streamed = {0: "", 1: ""}
    for c in chunks:
        streamed[c["choices"][0]["index"]] += c["choices"][0]["text"]
    assert streamed == {c["index"]: c["text"] for c in echoed["choices"]}
    # the default max_tokens is 16, as OpenAI's
    assert client.post("/v1/completions", json={"prompt": "the", "temperature": 0}).json()["usage"][
        "completion_tokens"] <= 16


# ----------------------------------------------------------------------------- reward scores


def test_score_route_equals_the_reward_scorer(client, dirs):
    scorer = RewardModelScorer(dirs["rm"])
    answers = ["2 plus 3 is 5.", "I hope this helps!", "fox"]
    raw, norm = scorer.score_text(["What is 2 plus 3?"] * 3, answers)
    r = client.post("/v1/score", json={"model": "rm", "prompt": "What is 2 plus 3?", "responses": answers}).json()
    assert r["object"] == "list" and r["normalized"] is True and [d["index"] for d in r["data"]] == [0, 1, 2]
    assert [d["raw_score"] for d in r["data"]] == pytest.approx(raw.tolist(), abs=1e-5)
    assert [d["score"] for d in r["data"]] == pytest.approx(
        [(x - REWARD_NORM["mean"]) / REWARD_NORM["std"] for x in raw.tolist()], abs=1e-5)
    assert norm.tolist() == pytest.approx([d["score"] for d in r["data"]], abs=1e-5)
    one = client.post("/v1/score", json={"model": "rm", "prompt": [{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Hi"}],
                                         "response": "Hello."}).json()
    assert len(one["data"]) == 1
    raw_only = client.post("/v1/score", json={"model": "raw", "prompt": "Hi", "responses": ["Hello."]}).json()
    assert raw_only["normalized"] is False and raw_only["data"][0]["score"] == raw_only["data"][0]["raw_score"]


# ----------------------------------------------------------------------------- errors


def test_every_error_is_openai_shaped_and_the_server_keeps_serving(client):
    long_msgs = [{"role": "user", "content": "the quick brown fox " * 40}]
    cases = [
        (client.post("/v1/chat/completions", content=b'{"model": "chat", "messages": [', 
                     headers={"content-type": "application/json"}), 400, "invalid_json", ["not valid JSON"]),
        (client.post("/v1/chat/completions", json=[1, 2]), 400, "invalid_json", ["JSON object"]),
        (client.post("/v1/chat/completions", content=b"\xff\xfe"), 400, "invalid_json", []),
        (chat(client, model="gpt-4"), 404, "model_not_found", ["gpt-4", "chat"]),
        (client.post("/v1/chat/completions", json={"model": "chat", "messages": long_msgs}), 400,
         "context_length_exceeded", ["maximum context length is 96"]),
        (chat(client, max_tokens=500), 400, "context_length_exceeded", ["500 in the completion", "max_tokens"]),
        (chat(client, max_completion_tokens=500), 400, "context_length_exceeded", ["max_completion_tokens"]),
        (client.post("/v1/completions", json={"model": "chat", "prompt": "fox " * 200, "max_tokens": 0}), 400,
         "context_length_exceeded", ["prompt"]),
        (client.post("/v1/completions", json={"model": "chat", "prompt": "fox", "max_tokens": 200}), 400,
         "context_length_exceeded", []),
        (chat(client, temperature=3), 400, "invalid_value", ["temperature", "<= 2"]),
        (chat(client, temperature="hot"), 400, "invalid_value", ["temperature", "number"]),
        (chat(client, top_p=0), 400, "invalid_value", ["top_p"]),
        (chat(client, top_p=1.5), 400, "invalid_value", ["top_p"]),
        (chat(client, n=0), 400, "invalid_value", ["'n'"]),
        (chat(client, max_tokens=0), 400, "invalid_value", ["max_tokens"]),
        (chat(client, max_tokens=2.5), 400, "invalid_value", ["integer"]),
        (chat(client, stop=[1]), 400, "invalid_value", ["stop"]),
        (chat(client, stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", ["stop"]),
        (chat(client, stream="yes"), 400, "invalid_value", ["stream"]),
        (chat(client, top_logprobs=2), 400, "invalid_value", ["logprobs"]),
        (client.post("/v1/chat/completions", json={"model": "chat"}), 400, "missing_required_parameter",
         ["messages"]),
        (client.post("/v1/chat/completions", json={"model": "chat", "messages": []}), 400, "invalid_value", []),
        (client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "bot", "content": "x"}]}),
         400, "invalid_value", ["bot"]),
        (client.post("/v1/chat/completions", json={"model": "chat", "messages": [
            {"role": "assistant", "content": "x"}]}), 400, "invalid_value", ["start"]),
        (client.post("/v1/completions", json={"model": "chat"}), 400, "missing_required_parameter", ["prompt"]),
        (client.post("/v1/completions", json={"model": "chat", "prompt": "x", "echo": "yes"}), 400,
         "invalid_value", ["echo"]),
        (client.post("/v1/completions", json={"model": "chat", "prompt": [5, 99999]}), 400, "invalid_value",
         ["vocabulary"]),
        (client.post("/v1/completions", json={"model": "chat", "prompt": "x", "logprobs": 50}), 400,
         "invalid_value", ["logprobs"]),
        (client.post("/v1/score", json={"model": "chat", "prompt": "x", "responses": ["y"]}), 400,
         "wrong_model_kind", ["reward"]),
        (client.post("/v1/chat/completions", json={"model": "rm", "messages": HI}), 400, "wrong_model_kind", []),
        (client.post("/v1/score", json={"model": "rm", "prompt": "x"}), 400, "missing_required_parameter",
         ["responses"]),
        (client.post("/v1/score", json={"model": "rm", "prompt": "x", "responses": [" "]}), 400, None, ["empty"]),
        (client.post("/v1/score", json={"model": "rm", "prompt": "fox " * 200, "responses": ["y"]}), 400,
         "context_length_exceeded", []),
        (client.get("/v1/nothing"), 404, None, ["no route"]),
        (client.get("/v1/chat/completions"), 405, None, ["not allowed"]),
    ]
    for r, status, code, words in cases:
        assert_error(r, status, code, words)
        ok = chat(client, temperature=0, max_tokens=2)  # still serving
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_api_key(client, monkeypatch):
    ctx = client.app.state.ctx
    monkeypatch.setattr(ctx, "api_key", "s3cret")
    assert_error(chat(client, max_tokens=2), 401, "missing_api_key", ["API key"])
    assert_error(client.post("/v1/chat/completions", json={"model": "chat", "messages": HI},
                             headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key", ["Incorrect"])
    assert_error(client.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401, "missing_api_key")
    ok = client.post("/v1/chat/completions", json={"model": "chat", "messages": HI, "max_tokens": 2},
                     headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # health needs no key


def test_context_generate_for_the_pages(client, ref):
    """ServeContext.generate (what the labelling page calls): n answers through the scheduler, as text."""
    import asyncio

    from chatforge.serve.context import ServeError

    ctx = client.app.state.ctx
    out = asyncio.run(ctx.generate("chat", HI, n=2, temperature=0.0, max_tokens=9))
    assert out == [engine_answer(ref, HI, 9, temperature=0.0)[2]] * 2
    seeded = asyncio.run(ctx.generate("chat", HI, n=2, temperature=1.0, max_tokens=9, seed=5))
    assert seeded == [engine_answer(ref, HI, 9, temperature=1.0, generator=torch.Generator().manual_seed(5 + i))[2]
                      for i in range(2)]
    for kw, word in [(dict(model_name="nope"), "does not exist"), (dict(temperature=-1), "temperature"),
                     (dict(top_p=0), "top_p"), (dict(n=0), "'n'"),
                     (dict(messages=[{"role": "user", "content": "fox " * 200}]), "context"),
                     (dict(messages=[{"role": "bot", "content": "x"}]), "role")]:
        args = {"model_name": "chat", "messages": HI, **kw}
        with pytest.raises(ServeError, match=word):
            asyncio.run(ctx.generate(**args))


def test_model_specs_and_bad_directories(tmp_path):
    from chatforge.serve.models import load_all, model_names

    assert model_names(["pol=/x/y", "/p/q/sft"]) == [("pol", "/x/y"), ("sft", "/p/q/sft")]
    with pytest.raises(ValueError, match="two models would be called 'sft'.*NAME=DIR"):
        model_names(["/a/sft", "/b/sft"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_all([str(tmp_path / "none")])
    with pytest.raises(ValueError, match="no config.json"):
        load_all([str(tmp_path)])
    with pytest.raises(ValueError, match="at least one --model"):
        load_all([])
