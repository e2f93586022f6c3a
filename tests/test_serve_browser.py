"""The web pages in a real browser: Debian's chromium, headless, driven by Selenium through the system chromedriver,
against a real server: `chatforge serve --api-key ... --labels-dir ... --candidates ...` (uvicorn) on 127.0.0.1, a
subprocess on a free port, stopped by pid.

- chat page: it asks for the API key (the server needs one) and lists the model once given it; a message is sent
  and the answer streams in (several pieces) equal to the server's own greedy answer; regenerate gives it again;
  reset clears the conversation; Stop aborts an endless stream and keeps its text; a refused request shows why.
- labelling page: it asks for the API key too; a ranking with a tie is submitted for a candidate and lands in the
  labels file; the model's k answers to a typed prompt (seeded: the same seed gives the same answers) are ranked
  and land there too; a written answer lands in the demonstrations file.

Screenshots of both pages are saved under the test's tmp folder (printed); with CHATFORGE_UPDATE_SCREENSHOTS=1 they
are also copied to docs/serve_chat.png and docs/serve_label.png. CHATFORGE_PAGES_MODEL=DIR serves that model
instead of the test's untrained micro model (e.g. the demo's sft/ for the README's screenshots).
Skips, saying how to install them, when chromium, chromedriver or selenium are missing. Selenium is never allowed
to download a driver or a browser: both paths are given and SE_OFFLINE is set.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from chatforge.serve import labels as L  # noqa: E402
from tests.serve_fixtures import running_server  # noqa: E402

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
CHAT_PROMPT = "What is 3 plus 4?"
LABEL_PROMPT = "Name a colour other than red."
CANDIDATES = [
    {"prompt_id": "cand-1", "prompt": "Say hello to Anna.",
     "answers": [{"id": "s0", "text": "Hello, Anna!"}, {"id": "s1", "text": "<b>Hi</b>, Anna!"},
                 {"id": "s2", "text": "Goodbye, Tom."}]},
    {"prompt_id": "cand-2", "prompt": "Count from 3 to 6.",
     "answers": [{"id": "s0", "text": "3, 4, 5, 6."}, {"id": "s1", "text": "3, 4, 6."}]},
]

KEY = "pages-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}



def streamed_text(url: str, body: dict, timeout: float = 60) -> str:
    """The text of a streamed chat completion: its chunks' deltas joined, read up to ``data: [DONE]``."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json", **AUTH})
    text = ""
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return text
            text += json.loads(data)["choices"][0]["delta"].get("content") or ""
    raise AssertionError("the stream ended without [DONE]")


def http_json(url: str, body=None, timeout: float = 60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **AUTH})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: install the browser with `{INSTALL}`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install selenium (the dev extra); and `" + INSTALL + "`")
    mp = pytest.MonkeyPatch()
    mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a driver or a browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1280,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        mp.undo()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if os.environ.get("CHATFORGE_PAGES_MODEL"):
        return Path(os.environ["CHATFORGE_PAGES_MODEL"])
    import torch

    from chatforge.config import ModelConfig
    from chatforge.model.gpt import GPT
    from chatforge.model.save import save_model_dir
    from chatforge.tokenizer import train_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("pages") / "model"
    tok = train_tokenizer(["Hello, Anna! What is 3 plus 4? 3 plus 4 is 7. Blue is a colour. Count from 3 to 6."] * 20,
                          300)
    # untied embeddings: a random tied model's greedy answer repeats the (special, invisible) last prompt token
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, tie_embeddings=False)
    model = GPT(cfg, tok.vocab_size)
    model.init_weights()
    save_model_dir(model, d, cfg, tok)
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("pages-server")
    cands = root / "candidates.jsonl"
    cands.write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
    args = ["--model", str(model_dir), "--api-key", KEY, "--labels-dir", str(root / "labels"),
            "--candidates", str(cands)]
    log = root / "server.log"
    with running_server(args, log) as url:
        model = http_json(url + "/v1/models")["data"][0]["id"]
        yield SimpleNamespace(url=url, labels=root / "labels", model=model, log=log)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = tmp_path_factory.mktemp("screenshots")
    yield d
    print(f"\nscreenshots of the pages: {d}")
    if os.environ.get("CHATFORGE_UPDATE_SCREENSHOTS") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        for name in ("serve_chat.png", "serve_label.png"):
            if (d / name).exists():
                shutil.copy(d / name, ROOT / "docs" / name)


def wait(driver, cond, timeout=60, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: cond(d), message=f"timed out waiting for {what}")


def css(driver, sel):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, sel)


def by_id(driver, id_):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def is_stale(el) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        el.is_enabled()
        return False
    except StaleElementReferenceException:
        return True


def text_of(el) -> str:
    return el.get_attribute("textContent")


def open_fresh(driver, url: str) -> None:
    """Load ``url`` with nothing remembered by the pages (no stored API key or settings)."""
    driver.get(url)
    driver.execute_script("window.localStorage.clear()")
    driver.get(url)


def chat_with_key(driver, server) -> None:
    """Open the chat page afresh; it asks for the API key (the server needs one); give it."""
    open_fresh(driver, server.url + "/")
    wait(driver, lambda d: by_id(d, "key-field").is_displayed(), what="the API-key field")  # /v1/models said 401
    assert "needs an API key" in by_id(driver, "banner").text and css(driver, "#model option") == []
    by_id(driver, "api_key").send_keys(KEY)
    by_id(driver, "input").click()  # leaving the field stores the key and lists the models again
    wait(driver, lambda d: css(d, "#model option"), what="the model list")
    assert not by_id(driver, "banner").is_displayed()


def set_values(driver, values: dict) -> None:
    """Set form fields as a person would leave them (the page reads them on send)."""
    driver.execute_script(
        "for (const [id, v] of Object.entries(arguments[0])) { const el = document.getElementById(id);"
        " el.value = v; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }", values)


def test_chat_page_streams_an_answer(browser, server, shots):
    d = browser
    max_tokens = 24
    expected = streamed_text(server.url + "/v1/chat/completions", {
        "model": server.model, "messages": [{"role": "user", "content": CHAT_PROMPT}],
        "temperature": 0, "max_tokens": max_tokens})
    assert len(expected) >= 2

    chat_with_key(d, server)
    assert [text_of(o) for o in css(d, "#model option")] == [server.model]
    set_values(d, {"temperature": "0", "max_tokens": str(max_tokens)})
    by_id(d, "input").send_keys(CHAT_PROMPT)
    by_id(d, "send").click()
    wait(d, lambda d: css(d, ".msg.assistant[data-state=done]"), what="the streamed answer")
    (answer,) = css(d, ".msg.assistant")
    assert text_of(css(answer, ".content")[0]) == expected  # the server's greedy answer, as streamed
    assert int(answer.get_attribute("data-chunks")) >= 2  # and it came in pieces
    assert [text_of(m) for m in css(d, ".msg.user .content")] == [CHAT_PROMPT]
    assert "chunks in" in by_id(d, "status").text
    d.save_screenshot(str(shots / "serve_chat.png"))

    by_id(d, "regenerate").click()  # the same greedy answer again, in place of the first
    wait(d, lambda d: is_stale(answer), what="regeneration to start")
    wait(d, lambda d: css(d, ".msg.assistant[data-state=done]"), what="the regenerated answer")
    assert [text_of(m) for m in css(d, ".msg.assistant .content")] == [expected]

    # a second turn carries the conversation, the system prompt and the settings
    d.execute_script("""
        const real = window.fetch; window.__sent = [];
        window.fetch = (url, opts) => { if (opts && opts.body) window.__sent.push(JSON.parse(opts.body)); return real(url, opts); };
    """)
    set_values(d, {"system": "Be brief.", "top_p": "0.9"})
    by_id(d, "input").send_keys("And 5 plus 5?")
    by_id(d, "send").click()
    # (the micro model's context may be too short for this turn: an error answer is fine, the request is the point)
    wait(d, lambda d: len(css(d, ".msg.assistant[data-state=done], .msg.assistant[data-state=error]")) == 2,
         what="the second answer")
    (sent,) = d.execute_script("return window.__sent")
    assert sent == {"model": server.model, "stream": True, "temperature": 0, "top_p": 0.9, "max_tokens": max_tokens,
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHAT_PROMPT},
                                 {"role": "assistant", "content": expected}, {"role": "user", "content": "And 5 plus 5?"}]}

    by_id(d, "reset").click()
    assert css(d, ".msg") == [] and by_id(d, "empty").is_displayed()
    assert d.execute_script("return state.messages") == []


def rank(driver, ranks: list) -> None:
    """Click rank ``ranks[i]`` on answer card i (None: leave it unranked)."""
    cards = css(driver, "#answers .answer")
    for card, r in zip(cards, ranks):
        if r is not None:
            css(card, f"button.rank[data-rank='{r}']")[0].click()


def test_label_page_stores_rankings_and_written_answers(browser, server, shots):
    d = browser
    labels_file = server.labels / "labels.jsonl"
    open_fresh(d, server.url + "/label")
    wait(d, lambda d: by_id(d, "key-card").is_displayed(), what="the API-key card")  # the label API said 401
    assert "needs an API key" in by_id(d, "message").text
    by_id(d, "api_key").send_keys(KEY)
    by_id(d, "key-save").click()
    wait(d, lambda d: text_of(by_id(d, "item-id")) == "cand-1", what="the first candidate")
    assert not by_id(d, "key-card").is_displayed()
    by_id(d, "labeler").send_keys("ann")
    cards = css(d, "#answers .answer")
    assert [text_of(css(c, ".content")[0]) for c in cards] == [a["text"] for a in CANDIDATES[0]["answers"]]
    assert css(d, "#answers b") == []  # "<b>Hi</b>" is shown as text, not as markup
    assert "2 of 2 candidates left" in by_id(d, "counts").text
    assert by_id(d, "submit").get_attribute("disabled") is not None  # nothing ranked yet

    rank(d, [1, 1, 2])  # a tie for first place
    assert by_id(d, "summary").text == "A = B > C"
    by_id(d, "submit").click()
    wait(d, lambda d: "Ranking saved" in by_id(d, "message").text, what="the saved ranking")
    (rec,) = L.read_labels(labels_file)
    assert rec["prompt_id"] == "cand-1" and rec["ranking"] == [["s0", "s1"], ["s2"]] and rec["labeler"] == "ann"
    assert rec["answers"] == CANDIDATES[0]["answers"] and rec["prompt"] == CANDIDATES[0]["prompt"]
    wait(d, lambda d: text_of(by_id(d, "item-id")) == "cand-2", what="the next candidate")
    assert "1 of 2 candidates left" in by_id(d, "counts").text

    # the served model answers a typed prompt k times; the person ranks those answers
    by_id(d, "tab-model").click()
    wait(d, lambda d: by_id(d, "model-panel").is_displayed(), what="the model panel")
    assert css(d, "#answers .answer") == []  # the candidate's answers are gone
    by_id(d, "prompt").send_keys(LABEL_PROMPT)
    set_values(d, {"k": "3", "max_tokens": "16", "temperature": "1", "seed": "0"})
    by_id(d, "generate").click()
    wait(d, lambda d: len(css(d, "#answers .answer")) >= 2, what="the model's answers")
    shown = [text_of(c) for c in css(d, "#answers .answer .content")]
    ranks = [1, 3, 2][: len(shown)]
    rank(d, ranks)
    d.save_screenshot(str(shots / "serve_label.png"))
    by_id(d, "submit").click()
    wait(d, lambda d: "Ranking saved" in by_id(d, "message").text and not by_id(d, "item").is_displayed(),
         what="the saved ranking of the model's answers")
    recs = L.read_labels(labels_file)
    assert len(recs) == 2
    assert recs[1]["prompt_id"] == L.prompt_id(LABEL_PROMPT) and recs[1]["prompt"] == LABEL_PROMPT
    assert [a["text"] for a in recs[1]["answers"]] == shown
    assert recs[1]["ranking"] == [[L.answer_id(t)] for _, t in sorted(zip(ranks, shown))]

    # a better answer, written by the person, goes to the demonstrations file
    by_id(d, "generate").click()  # the same seed: the same answers
    wait(d, lambda d: by_id(d, "item").is_displayed(), what="new answers")
    assert [text_of(c) for c in css(d, "#answers .answer .content")] == shown
    css(d, "#write summary")[0].click()
    by_id(d, "better").send_keys("Blue is a colour.")
    by_id(d, "save-better").click()
    wait(d, lambda d: "Answer saved" in by_id(d, "message").text, what="the saved answer")
    demos = L.read_demonstrations(server.labels / "demonstrations.jsonl")
    assert demos == [{"messages": [{"role": "user", "content": LABEL_PROMPT},
                                   {"role": "assistant", "content": "Blue is a colour."}]}]
    assert len(L.read_labels(labels_file)) == 2


def test_chat_page_sse_parser(browser, server):
    """The page's event-stream parser on awkward byte streams: an event split across reads, a UTF-8 character split
    across reads, CRLF line ends with the CR and LF in different reads, a multi-line data field, comments, and a
    last event without its blank line."""
    d = browser
    d.get(server.url + "/")
    chunks = [b"data: one\n", b"\ndata: t", b"wo\n\n: a comment\n\ndata: \xc3", b"\xa9t\xc3\xa9\r", b"\n\r\n",
              b"data: line 1\ndata: line 2\n\nevent: x\ndata: [DONE]\n\n", b"data: tail"]
    got = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const chunks = arguments[0].map((c) => new Uint8Array(c));
        const body = new ReadableStream({ start(ctl) { for (const c of chunks) ctl.enqueue(c); ctl.close(); } });
        (async () => { const out = []; for await (const x of sseData(body)) out.push(x); return out; })()
          .then(done, (e) => done("error: " + e));
    """, [list(c) for c in chunks])
    assert got == ["one", "two", "été", "line 1\nline 2", "[DONE]", "tail"]


def test_chat_page_stop_and_errors(browser, server):
    """Stop aborts a stream that would never end (the page's fetch is swapped for an endless stream) and keeps the
    text so far; a request the server refuses shows the server's message and leaves no empty answer behind."""
    d = browser
    chat_with_key(d, server)
    set_values(d, {"max_tokens": "100000"})  # past the model's context: the server says so
    by_id(d, "input").send_keys("Hello?")
    by_id(d, "send").click()
    wait(d, lambda d: css(d, ".msg.assistant .note.error"), what="the error")
    note = text_of(css(d, ".msg.assistant .note.error")[0])
    assert note.startswith("Error: ") and "max_tokens" in note
    assert text_of(css(d, ".msg.assistant .content")[0]) == ""
    assert d.execute_script("return state.messages.length") == 1  # no empty answer in the conversation
    by_id(d, "reset").click()

    d.execute_script("""
        window.__aborted = false;
        window.fetch = (url, opts) => {
          const enc = new TextEncoder();
          let timer;
          const body = new ReadableStream({
            start(ctl) {
              let i = 0;
              timer = setInterval(() => ctl.enqueue(enc.encode(
                'data: ' + JSON.stringify({choices: [{index: 0, delta: {content: 'w' + (i++) + ' '}}]}) + '\\n\\n')), 30);
              opts.signal.addEventListener('abort', () => {
                window.__aborted = true; clearInterval(timer); ctl.error(new DOMException('aborted', 'AbortError'));
              });
            },
            cancel() { clearInterval(timer); },
          });
          return Promise.resolve(new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}}));
        };
    """)
    by_id(d, "input").send_keys("Talk forever.")
    by_id(d, "send").click()
    wait(d, lambda d: int(css(d, ".msg.assistant")[0].get_attribute("data-chunks") or 0) >= 3, what="a few chunks")
    assert by_id(d, "send").get_attribute("disabled") is not None  # one answer at a time
    by_id(d, "stop").click()
    wait(d, lambda d: css(d, ".msg.assistant[data-state=done]"), what="the stopped answer")
    assert d.execute_script("return window.__aborted") is True
    (answer,) = css(d, ".msg.assistant")
    kept = text_of(css(answer, ".content")[0])
    assert kept.startswith("w0 w1 w2 ") and "Stopped." in text_of(answer)
    assert by_id(d, "stop").get_attribute("disabled") is not None and by_id(d, "send").get_attribute("disabled") is None
    assert d.execute_script("return state.messages") == [{"role": "user", "content": "Talk forever."},
                                                          {"role": "assistant", "content": kept}]
