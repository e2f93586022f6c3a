"""A real server and a real client: `chatforge serve` (uvicorn) started on 127.0.0.1 on a free port in a
subprocess, driven with the `openai` Python client: chat (streaming and not), completions with log-probs,
16 concurrent streaming requests whose greedy answers equal their solo answers, a client that disconnects
mid-stream frees its slot, errors and the API key."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from chatforge.engine import Engine  # noqa: E402
from chatforge.model.load import load_causal_lm  # noqa: E402
from chatforge.tokenizer import render_prompt  # noqa: E402
from tests.serve_fixtures import build_chat_dir, micro_gpt, micro_tokenizer, running_server  # noqa: E402

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
QUESTIONS = ["What is 2 plus 3?", "Hello, how are you?", "the quick brown fox", "caf\u00e9 \u65e5\u672c\u8a9e",
             "Sure!", "I hope this helps", "jumps over", "2 plus 3 is", "lazy dog", "na\u00efve \u00fcber",
             "What is", "Hello", "fox fox fox", "is 5.", "how are", "quick"]



@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from chatforge.stages.common import save_model_dir

    root = tmp_path_factory.mktemp("server")
    tok = micro_tokenizer()
    long = micro_gpt(tok.vocab_size, seed=3, block_size=4096)  # a long context: an answer that takes a while
    with torch.no_grad():  # stop ids get logit 0 < the largest other logit: greedy answers never end early
        long.lm_head.weight[[tok.end_id, tok.eot_id]] = 0.0
    save_model_dir(long, root / "long", long.cfg, tok)
    return {"chat": build_chat_dir(root), "long": root / "long"}


@pytest.fixture(scope="module")
def server(dirs):
    args = ["--model", str(dirs["chat"]), "--model", str(dirs["long"]), "--api-key", KEY, "--max-batch", "16"]
    with running_server(args, dirs["chat"].parent / "server.log", timeout_s=90) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=60, max_retries=0)


def msgs(q):
    return [{"role": "user", "content": q}]


def engine_text(d, question, n):
    model, _, tok = load_causal_lm(d)
    stop = [tok.end_id, tok.eot_id]
    res = Engine(model.eval()).generate([render_prompt(tok, msgs(question))], n, temperature=0.0, stop_ids=stop)
    return tok.decode([t for t in res.tokens[0] if t not in stop], skip_special=True), res.tokens[0]


def stream_text(client, question, max_tokens, model="chat"):
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=msgs(question), temperature=0,
                                                max_tokens=max_tokens, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_chat_with_the_openai_client(client, dirs):
    want, ids = engine_text(dirs["chat"], QUESTIONS[0], 20)
    r = client.chat.completions.create(model="chat", messages=msgs(QUESTIONS[0]), temperature=0, max_tokens=20)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ids)
    text, finish = stream_text(client, QUESTIONS[0], 20)
    assert text == want and finish == r.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model="chat", messages=msgs(QUESTIONS[0]), temperature=0,
                                                 max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == len(ids) and chunks[-1].choices == []
    assert [m.id for m in client.models.list().data] == ["chat", "long"]


def test_completions_logprobs_with_the_openai_client(client, dirs):
    model, _, tok = load_causal_lm(dirs["chat"])
    text = "the lazy dog"
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    r = client.completions.create(model="chat", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs == pytest.approx([logp[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    g = client.completions.create(model="chat", prompt=text, max_tokens=5, temperature=0, logprobs=0)
    assert len(g.choices[0].logprobs.token_logprobs) == g.usage.completion_tokens


def test_16_concurrent_streams_equal_their_solo_answers(client, server):
    sizes = [8 + 3 * i for i in range(16)]  # different lengths: requests leave the batch at different steps
    solo = [stream_text(client, q, n) for q, n in zip(QUESTIONS, sizes)]
    before = httpx.get(f"{server}/health").json()["requests"]["chat"]["finished"]
    out: list = [None] * 16
    errors: list = []
    gate = threading.Barrier(16, timeout=60)

    def one(i):
        try:
            gate.wait()
            out[i] = stream_text(client, QUESTIONS[i], sizes[i])
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and out == solo
    assert len({t for t, _ in solo}) > 8
    assert httpx.get(f"{server}/health").json()["requests"]["chat"]["finished"] == before + 16


def test_disconnect_mid_stream_frees_the_slot(server):
    def load():
        return httpx.get(f"{server}/health").json()["requests"]["long"]

    before = load()
    body = {"model": "long", "messages": msgs("Hello"), "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events, then hang up
            assert any('"content"' in x for x in got)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = load()
        if now["active"] == 0 and now["cancelled"] == before["cancelled"] + 1:
            break
        time.sleep(0.1)
    assert now["active"] == 0 and now["cancelled"] == before["cancelled"] + 1
    assert now["finished"] == before["finished"]  # it was cut off, not run to its end


def test_errors_through_the_openai_client(client, server):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="chat", messages=msgs("hi"), max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=msgs("hi"))
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="chat", messages=msgs("hi"), temperature=7)
    bad_key = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad_key.models.list()
    assert client.chat.completions.create(model="chat", messages=msgs("hi"), max_tokens=3).usage.completion_tokens <= 3
