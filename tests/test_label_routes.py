"""The web pages and the labelling routes, mounted on a bare FastAPI app with a stand-in context (no model):
pages served, candidates ranked in file order, generated answers ranked, written answers stored, errors
OpenAI-shaped, the API key honoured."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from chatforge.data.conversations import read_conversations  # noqa: E402
from chatforge.serve import labels as L  # noqa: E402
from chatforge.serve.label_routes import add_label_routes  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class UnknownModel(ValueError):
    """Stands for the API's ServeError: a ValueError with an HTTP status."""

    def __init__(self, name):
        super().__init__(f"The model '{name}' does not exist")
        self.message, self.status, self.param, self.code = str(self), 404, "model", "model_not_found"


class FakeContext:
    """What add_label_routes reads from the server's context; generate answers from a fixed list."""

    def __init__(self, labels_dir=None, candidates=None, prompts=None, api_key=None):
        self.models = {"policy": SimpleNamespace(kind="chat"), "rm": SimpleNamespace(kind="reward")}
        self.labels_dir, self.candidates, self.prompts, self.api_key = labels_dir, candidates, prompts, api_key
        self.calls = []

    async def generate(self, model_name, messages, n=1, temperature=1.0, top_p=1.0, max_tokens=None, seed=None):
        if model_name not in self.models:
            raise UnknownModel(model_name)
        self.calls.append(dict(model=model_name, messages=messages, n=n, temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, seed=seed))
        pool = ["Four.", "4", "Four.", "  ", "It is four.", "five"]  # a repeat and an empty answer
        return [pool[i % len(pool)] for i in range(n)]


CANDIDATES = [
    {"prompt_id": "c1", "prompt": "What is 2 plus 2?",
     "answers": [{"id": "s0", "text": "4"}, {"id": "s1", "text": "<b>five</b>"}, {"id": "s2", "text": "Four."}]},
    {"prompt_id": "c2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "answers": [{"id": "s0", "text": "Hello."}, {"id": "s1", "text": "Hi!"}]},
]


def make_client(tmp_path, **kw):
    ctx = FakeContext(**kw)
    app = FastAPI()
    add_label_routes(app, ctx)
    return TestClient(app), ctx


@pytest.fixture
def files(tmp_path):
    cands = tmp_path / "candidates.jsonl"
    cands.write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n" + json.dumps("Name a tree.") + "\n")
    return SimpleNamespace(labels=tmp_path / "labels", candidates=str(cands), prompts=str(prompts))


def test_pages_are_served(tmp_path):
    client, _ = make_client(tmp_path)
    chat = client.get("/")
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("text/html")
    assert 'id="messages"' in chat.text and "/v1/chat/completions" in chat.text
    label = client.get("/label")
    assert label.status_code == 200 and "/label/api/" in label.text and 'id="answers"' in label.text
    for page in (chat.text, label.text):  # nothing fetched from elsewhere, model text never set as HTML
        assert "http://" not in page and "https://" not in page and "innerHTML" not in page


def test_candidates_are_ranked_in_file_order(tmp_path, files):
    client, _ = make_client(tmp_path, labels_dir=str(files.labels), candidates=files.candidates)
    st = client.get("/label/api/state").json()
    assert st["labels"] == 0 and st["candidates"] == {"file": "candidates.jsonl", "total": 2, "unlabelled": 2}
    assert st["models"] == ["policy"] and st["prompts"] is None
    item = client.get("/label/api/next").json()["item"]
    assert item == dict(CANDIDATES[0], source="candidates")
    assert client.get("/label/api/next", params={"skip": "c1"}).json()["item"]["prompt_id"] == "c2"

    sub = {"prompt_id": "c1", "prompt": item["prompt"], "answers": item["answers"],
           "ranking": [["s2", "s0"], ["s1"]], "labeler": "ann"}
    r = client.post("/label/api/rank", json=sub)
    assert r.status_code == 200 and r.json()["stored"] and r.json()["labels"] == 1
    again = client.post("/label/api/rank", json=dict(sub, ranking=[["s0", "s2"], ["s1"]]))
    assert again.status_code == 200 and not again.json()["stored"]
    recs = L.read_labels(files.labels / "labels.jsonl")
    assert len(recs) == 1
    assert {k: v for k, v in recs[0].items() if k != "time"} == {
        "prompt_id": "c1", "prompt": "What is 2 plus 2?", "answers": CANDIDATES[0]["answers"],
        "ranking": [["s2", "s0"], ["s1"]], "labeler": "ann"}
    assert client.get("/label/api/next").json() == {"item": dict(CANDIDATES[1], source="candidates"), "unlabelled": 1}

    # a multi-turn candidate; then nothing is left
    c2 = CANDIDATES[1]
    assert client.post("/label/api/rank", json={"prompt_id": "c2", "prompt": c2["prompt"], "answers": c2["answers"],
                                                "ranking": [["s1"], ["s0"]]}).json()["stored"]
    assert client.get("/label/api/next").json() == {"item": None, "unlabelled": 0}
    assert client.get("/label/api/state").json()["candidates"]["unlabelled"] == 0

    # a submission must be what the page was shown
    bad = client.post("/label/api/rank", json=dict(sub, answers=[{"id": "s0", "text": "5"}], ranking=[["s0"], ["s1"]]))
    assert bad.status_code == 400 and "not one of candidate 'c1'" in bad.json()["error"]["message"]
    bad = client.post("/label/api/rank", json=dict(sub, prompt="What is 3 plus 3?"))
    assert bad.status_code == 400 and "prompt differs" in bad.json()["error"]["message"]
    bad = client.post("/label/api/rank", json=dict(sub, ranking=[["s0"], ["s9"]]))
    assert bad.status_code == 400 and "'s9', which is not an answer id" in bad.json()["error"]["message"]
    assert len(L.read_labels(files.labels / "labels.jsonl")) == 2


def test_generated_answers_are_ranked(tmp_path, files):
    client, ctx = make_client(tmp_path, labels_dir=str(files.labels), prompts=files.prompts)
    st = client.get("/label/api/state").json()
    assert st["candidates"] is None and st["prompts"] == {"file": "prompts.jsonl", "total": 2, "unlabelled": 2}
    assert client.get("/label/api/next").status_code == 404

    p = client.get("/label/api/prompt").json()
    assert p == {"prompt": "Name a fruit.", "prompt_id": L.prompt_id("Name a fruit.")}
    r = client.post("/label/api/generate", json={"prompt": p["prompt"], "k": 6, "temperature": 0.5, "top_p": 0.9,
                                                 "max_tokens": 20, "seed": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert ctx.calls == [dict(model="policy", messages=[{"role": "user", "content": "Name a fruit."}], n=6,
                              temperature=0.5, top_p=0.9, max_tokens=20, seed=3)]
    item = out["item"]
    assert [a["text"] for a in item["answers"]] == ["Four.", "4", "It is four.", "five"]
    assert out["duplicates"] == 1 and out["empty"] == 1
    assert item["prompt_id"] == p["prompt_id"] and all(a["id"] == L.answer_id(a["text"]) for a in item["answers"])

    a = item["answers"]
    sub = {"prompt_id": item["prompt_id"], "prompt": item["prompt"], "answers": a,
           "ranking": [[a[2]["id"]], [a[0]["id"], a[1]["id"]]]}
    assert client.post("/label/api/rank", json=sub).json()["stored"]
    # the labelled prompt is no longer offered
    assert client.get("/label/api/prompt").json()["prompt"] == "Name a tree."
    assert client.get("/label/api/prompt", params={"skip": L.prompt_id("Name a tree.")}).json()["prompt"] is None
    rec = L.read_labels(files.labels / "labels.jsonl")[0]
    assert [(x["chosen"], x["rejected"]) for x in L.ranking_to_pairs(rec)] == [("It is four.", "Four."), ("It is four.", "4")]

    # ids that are not the hashes of the prompt / texts are refused
    bad = client.post("/label/api/rank", json=dict(sub, prompt_id="p-0000"))
    assert bad.status_code == 400 and "unknown prompt_id" in bad.json()["error"]["message"]
    forged = [dict(a[0], text="something else")] + a[1:]
    bad = client.post("/label/api/rank", json=dict(sub, answers=forged))
    assert bad.status_code == 400 and "not the hash of its text" in bad.json()["error"]["message"]

    # bad generation requests
    for body, msg in [({"prompt": "x", "k": 1}, "'k' must be in [2, 16]"),
                      ({"prompt": "x", "top_p": 0}, "'top_p' must be in (0.0, 1.0]"),
                      ({"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
                      ({"prompt": ""}, "empty"),
                      ({"k": 2}, "missing field 'prompt'")]:
        bad = client.post("/label/api/generate", json=body)
        assert bad.status_code == 400 and msg in bad.json()["error"]["message"], (body, bad.text)
    unknown = client.post("/label/api/generate", json={"prompt": "x", "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_written_answers_go_to_the_sft_file(tmp_path, files):
    client, _ = make_client(tmp_path, labels_dir=str(files.labels))
    r = client.post("/label/api/demonstration", json={"prompt": "Name a fruit.", "answer": "An apple."})
    assert r.status_code == 200 and r.json() == {"stored": True, "demonstrations": 1}
    assert client.post("/label/api/demonstration", json={"prompt": "Name a fruit.", "answer": "An apple."}).json() == {
        "stored": False, "demonstrations": 1}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert client.post("/label/api/demonstration", json={"prompt": msgs, "answer": "Hello."}).json()["stored"]
    bad = client.post("/label/api/demonstration", json={"prompt": "Name a fruit.", "answer": ""})
    assert bad.status_code == 400 and "empty" in bad.json()["error"]["message"]
    convs = read_conversations(files.labels / "demonstrations.jsonl")
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
        msgs + [{"role": "assistant", "content": "Hello."}]]


def test_errors_key_and_labelling_off(tmp_path, files):
    client, _ = make_client(tmp_path, labels_dir=str(files.labels), candidates=files.candidates, api_key="sekret")
    assert client.get("/label").status_code == 200  # the pages themselves are open; their API calls carry the key
    for method, path in [("get", "state"), ("get", "next"), ("get", "prompt"), ("post", "generate"),
                         ("post", "rank"), ("post", "demonstration")]:
        r = getattr(client, method)("/label/api/" + path)
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "missing_api_key" and "Bearer KEY" in r.json()["error"]["message"]
    wrong = client.get("/label/api/state", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = client.get("/label/api/state", headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json()["candidates"]["total"] == 2
    auth = {"Authorization": "Bearer sekret"}
    bad = client.post("/label/api/rank", content=b"{oops", headers={**auth, "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "the request body is not valid JSON"
    bad = client.post("/label/api/rank", json=[1, 2], headers=auth)
    assert bad.status_code == 400 and "JSON object" in bad.json()["error"]["message"]

    off, _ = make_client(tmp_path)  # no labels folder: the pages still load, the API says why it cannot label
    assert off.get("/label").status_code == 200
    r = off.get("/label/api/state")
    assert r.status_code == 404 and r.json()["error"]["code"] == "labelling_off"


def test_a_broken_labels_file_stops_the_start(tmp_path):
    d = tmp_path / "labels"
    d.mkdir()
    (d / "labels.jsonl").write_text("{broken\n")
    with pytest.raises(L.DataError, match="labels.jsonl:1: invalid JSON"):
        make_client(tmp_path, labels_dir=str(d))


# ----------------------------------------------------------------------------- the real server app


def test_routes_in_the_server_app(tmp_path):
    """The same routes inside `create_app` with a micro chat model and a reward model: the model's k answers are its
    seeded samples (answer i = the API's answer with seed + i), rankings land in the labels file, the API's errors
    (a reward model asked to answer, a prompt past the context) come back OpenAI-shaped."""
    from chatforge.serve.app import create_app
    from tests.serve_fixtures import build_chat_dir, build_reward_dir

    chat_dir, rm_dir = build_chat_dir(tmp_path), build_reward_dir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("What is 2 plus 3?") + "\n")
    app = create_app([str(chat_dir), str(rm_dir)], api_key="k", labels_dir=str(tmp_path / "labels"),
                     prompts=str(prompts))
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        assert client.get("/").status_code == 200 and client.get("/label").status_code == 200
        assert client.get("/label/api/state").status_code == 401
        st = client.get("/label/api/state", headers=auth).json()
        assert st["models"] == ["chat"] and st["prompts"]["total"] == 1 and st["labels"] == 0
        prompt = client.get("/label/api/prompt", headers=auth).json()["prompt"]
        body = {"prompt": prompt, "k": 3, "temperature": 1.0, "max_tokens": 8, "seed": 11}
        out = client.post("/label/api/generate", json=body, headers=auth).json()
        assert client.post("/label/api/generate", json=body, headers=auth).json() == out  # seeded: the same again
        api = [client.post("/v1/chat/completions", headers=auth, json={
            "model": "chat", "messages": [{"role": "user", "content": prompt}], "temperature": 1.0, "max_tokens": 8,
            "seed": 11 + i}).json()["choices"][0]["message"]["content"] for i in range(3)]
        distinct = list(dict.fromkeys(t for t in api if t.strip()))
        assert [a["text"] for a in out["item"]["answers"]] == distinct and len(distinct) >= 2
        a = out["item"]["answers"]
        r = client.post("/label/api/rank", headers=auth, json={
            "prompt_id": out["item"]["prompt_id"], "prompt": prompt, "answers": a, "ranking": [[a[1]["id"]], [a[0]["id"]]]})
        assert r.status_code == 200 and r.json()["stored"]
        assert L.ranking_to_pairs(L.read_labels(tmp_path / "labels" / "labels.jsonl")[0]) == [
            {"prompt": prompt, "chosen": a[1]["text"], "rejected": a[0]["text"]}]
        assert client.get("/label/api/prompt", headers=auth).json()["prompt"] is None

        wrong = client.post("/label/api/generate", headers=auth, json={"prompt": "Hi", "model": "rm"})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_model_kind"
        long = client.post("/label/api/generate", headers=auth, json={"prompt": "fox " * 400})
        assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
