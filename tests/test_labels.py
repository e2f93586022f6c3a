"""The label store: atomic appends, one copy per submission, restarts, torn last lines, bad lines named by file and
line; ranking_to_pairs against hand-written pairs; the files read by the sft and preference readers as they are."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

import pytest

from chatforge.data.conversations import read_conversations
from chatforge.data.preferences import read_preferences
from chatforge.data.records import DataError, RecordProblem
from chatforge.serve import labels as L

pytestmark = pytest.mark.timeout(60)


def answers(*texts):
    return [{"id": L.answer_id(t), "text": t} for t in texts]


def ids(ans):
    return [a["id"] for a in ans]


def lines(path):
    return path.read_bytes().decode().splitlines()


# ----------------------------------------------------------------------------- ids and pairs


def test_ids_are_hashes_of_the_prompt_and_text():
    want = "p-" + hashlib.sha256(json.dumps("Hi there", ensure_ascii=False).encode()).hexdigest()[:16]
    assert L.prompt_id("Hi there") == want
    assert L.prompt_id([{"role": "user", "content": "Hi there"}]) == want  # one user message is the string
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert L.prompt_id(two) != want
    assert L.answer_id("ok") == "a-" + hashlib.sha256(b'"ok"').hexdigest()[:16]


def test_ranking_to_pairs_hand_computed():
    rec = {"prompt_id": "q1", "prompt": "Name a colour.",
           "answers": [{"id": "a", "text": "red"}, {"id": "b", "text": "blue"}, {"id": "c", "text": "a car"},
                       {"id": "d", "text": "no"}, {"id": "e", "text": "green"}],
           "ranking": [["a"], ["b", "c"], ["d"]], "time": "2026-01-01T00:00:00+00:00"}  # e unranked
    assert L.ranking_to_pairs(rec) == [
        {"prompt": "Name a colour.", "chosen": "red", "rejected": "blue"},
        {"prompt": "Name a colour.", "chosen": "red", "rejected": "a car"},
        {"prompt": "Name a colour.", "chosen": "red", "rejected": "no"},
        {"prompt": "Name a colour.", "chosen": "blue", "rejected": "no"},
        {"prompt": "Name a colour.", "chosen": "a car", "rejected": "no"},
    ]
    # a tie of two groups each of two: 4 pairs; answers in one group are not compared
    rec2 = dict(rec, ranking=[["a", "e"], ["b", "d"]])
    assert [(p["chosen"], p["rejected"]) for p in L.ranking_to_pairs(rec2)] == [
        ("red", "blue"), ("red", "no"), ("green", "blue"), ("green", "no")]
    # the same text under two ids gives no pair; a message-list prompt is passed through
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    rec3 = {"prompt_id": "q3", "prompt": msgs, "answers": [{"id": "x", "text": "same"}, {"id": "y", "text": "same"},
                                                         {"id": "z", "text": "other"}],
            "ranking": [["x"], ["y"], ["z"]], "time": "2026-01-01T00:00:00"}
    assert L.ranking_to_pairs(rec3) == [{"prompt": msgs, "chosen": "same", "rejected": "other"},
                                        {"prompt": msgs, "chosen": "same", "rejected": "other"}]


def test_pairs_are_read_by_the_preference_reader(tmp_path):
    store = L.LabelStore(tmp_path / "labels")
    a = answers("Paris.", "Lyon.", "I do not know.")
    store.add_ranking(L.prompt_id("Capital of France?"), "Capital of France?", a, [[a[0]["id"]], [a[1]["id"], a[2]["id"]]])
    pairs = [p for r in L.read_labels(store.labels.path) for p in L.ranking_to_pairs(r)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    got = read_preferences(f)
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [
        ([{"role": "user", "content": "Capital of France?"}], "Paris.", "Lyon."),
        ([{"role": "user", "content": "Capital of France?"}], "Paris.", "I do not know.")]


# ----------------------------------------------------------------------------- the store


def test_append_restart_and_one_copy_per_submission(tmp_path):
    d = tmp_path / "labels"
    store = L.LabelStore(d)
    a = answers("one", "two", "three")
    pid = L.prompt_id("Count.")
    first = store.add_ranking(pid, "Count.", a, [[a[0]["id"]], [a[1]["id"], a[2]["id"]]], labeler="ann")
    assert first.stored and store.labels.count == 1
    # the same ranking again (tie order swapped, another time): stored once
    again = store.add_ranking(pid, "Count.", a, [[a[0]["id"]], [a[2]["id"], a[1]["id"]]], labeler="ann",
                              time="2030-01-01T00:00:00+00:00")
    assert not again.stored and store.labels.count == 1
    # another labeler, or another ranking, is another submission
    assert store.add_ranking(pid, "Count.", a, [[a[0]["id"]], [a[1]["id"], a[2]["id"]]], labeler="bob").stored
    assert store.add_ranking(pid, "Count.", a, [[a[1]["id"]], [a[0]["id"]]], labeler="ann").stored
    assert store.add_demonstration("Count.", "one, two, three").stored
    assert not store.add_demonstration([{"role": "user", "content": "Count."}], "one, two, three").stored
    store.close()
    assert len(lines(d / "labels.jsonl")) == 3 and len(lines(d / "demonstrations.jsonl")) == 1

    # a restart keeps everything and still knows what was submitted
    store2 = L.LabelStore(d)
    assert store2.labels.count == 3 and store2.demonstrations.count == 1
    assert store2.labelled_prompt_ids() == {pid}
    assert not store2.add_ranking(pid, "Count.", a, [[a[0]["id"]], [a[1]["id"], a[2]["id"]]], labeler="ann").stored
    assert not store2.add_demonstration("Count.", "one, two, three").stored
    recs = L.read_labels(d / "labels.jsonl")
    assert [r.get("labeler") for r in recs] == ["ann", "bob", "ann"]
    assert recs[0] == {"prompt_id": pid, "prompt": "Count.", "answers": a,
                       "ranking": [[a[0]["id"]], [a[1]["id"], a[2]["id"]]], "labeler": "ann", "time": recs[0]["time"]}
    assert recs[0]["time"].endswith("+00:00")


def test_demonstrations_are_read_by_the_sft_reader(tmp_path):
    store = L.LabelStore(tmp_path)
    store.add_demonstration("What is 2 plus 3?", "2 plus 3 is 5.")
    ctx = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    store.add_demonstration(ctx, "Goodbye!")
    convs = read_conversations(tmp_path / "demonstrations.jsonl")
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
        ctx + [{"role": "assistant", "content": "Goodbye!"}]]
    assert json.loads(lines(tmp_path / "demonstrations.jsonl")[0]) == {"messages": convs[0].messages}


def test_bad_submissions_write_nothing(tmp_path):
    store = L.LabelStore(tmp_path)
    a = answers("x", "y")
    pid = L.prompt_id("P")
    cases = [
        ([[a[0]["id"]], ["nope"]], "not an answer id"),
        ([[a[0]["id"]], [a[0]["id"]]], "more than once"),
        ([[a[0]["id"], a[1]["id"]]], "at least two groups"),
        ([[a[0]["id"]], []], "non-empty list"),
        ("x > y", "list of tie groups"),
    ]
    for ranking, msg in cases:
        with pytest.raises(RecordProblem, match=msg):
            store.add_ranking(pid, "P", a, ranking)
    with pytest.raises(RecordProblem, match="repeats the id"):
        store.add_ranking(pid, "P", [a[0], a[0]], [[a[0]["id"]], [a[0]["id"]]])
    with pytest.raises(RecordProblem, match="empty"):
        store.add_ranking(pid, "", a, [[a[0]["id"]], [a[1]["id"]]])
    with pytest.raises(RecordProblem, match="does not end with a user turn"):
        store.add_ranking(pid, [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}], a,
                          [[a[0]["id"]], [a[1]["id"]]])
    with pytest.raises(RecordProblem, match="empty"):
        store.add_demonstration("P", "   ")
    assert (tmp_path / "labels.jsonl").read_bytes() == b"" and (tmp_path / "demonstrations.jsonl").read_bytes() == b""


def test_bad_line_is_named_by_file_and_line(tmp_path):
    good = {"prompt_id": "q", "prompt": "P", "answers": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}],
            "ranking": [["a"], ["b"]], "time": "2026-01-01T00:00:00+00:00"}
    f = tmp_path / "labels.jsonl"
    bad_lines = {
        "{not json": "invalid JSON",
        json.dumps(dict(good, ranking=[["a"], ["c"]])): "'c', which is not an answer id",
        json.dumps({k: v for k, v in good.items() if k != "time"}): "missing field 'time'",
        json.dumps(dict(good, time="yesterday")): "not an ISO-8601 time",
        json.dumps([1, 2]): "expected a JSON object",
    }
    for bad, msg in bad_lines.items():
        f.write_text(json.dumps(good) + "\n\n" + bad + "\n" + json.dumps(good) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            L.read_labels(f)
        assert str(e.value).startswith(f"{f}:3: ")
        with pytest.raises(DataError, match=f"{f}:3: "):  # the store refuses to start on it too
            L.LabelStore(tmp_path)


def test_torn_last_line_is_skipped_and_moved_aside(tmp_path, caplog):
    store = L.LabelStore(tmp_path)
    a = answers("x", "y")
    store.add_ranking(L.prompt_id("P"), "P", a, [[a[0]["id"]], [a[1]["id"]]])
    store.close()
    f = tmp_path / "labels.jsonl"
    whole = f.read_bytes()
    with open(f, "ab") as fh:  # what a crash in the middle of a write leaves
        fh.write(b'{"prompt_id": "p-half", "prompt": "Q", "ans')
    with caplog.at_level(logging.WARNING, logger="chatforge.serve"):
        assert len(L.read_labels(f)) == 1
    assert "unfinished last line" in caplog.text
    store = L.LabelStore(tmp_path)  # opening moves the tail aside; the next append starts a fresh line
    assert f.read_bytes() == whole
    assert (tmp_path / "labels.jsonl.torn").read_bytes() == b'{"prompt_id": "p-half", "prompt": "Q", "ans\n'
    assert store.add_ranking(L.prompt_id("Q"), "Q", a, [[a[1]["id"]], [a[0]["id"]]]).stored
    assert [r["prompt"] for r in L.read_labels(f)] == ["P", "Q"]

    # a whole valid record that only lacks its newline (a hand-edited file) is kept and completed
    d2 = tmp_path / "d2"
    d2.mkdir()
    rec = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}
    (d2 / "demonstrations.jsonl").write_text(json.dumps(rec))
    store2 = L.LabelStore(d2)
    assert store2.demonstrations.count == 1 and (d2 / "demonstrations.jsonl").read_text() == json.dumps(rec) + "\n"
    assert not store2.add_demonstration("u", "v").stored


def test_failed_write_leaves_no_half_line(tmp_path, monkeypatch):
    store = L.LabelStore(tmp_path)
    a = answers("x", "y")
    store.add_ranking(L.prompt_id("P"), "P", a, [[a[0]["id"]], [a[1]["id"]]])
    before = (tmp_path / "labels.jsonl").read_bytes()
    real_write = os.write

    def half_then_fail(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(L.os, "write", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        store.add_ranking(L.prompt_id("Q"), "Q", a, [[a[0]["id"]], [a[1]["id"]]])
    monkeypatch.setattr(L.os, "write", real_write)
    assert (tmp_path / "labels.jsonl").read_bytes() == before
    assert store.labels.count == 1
    assert store.add_ranking(L.prompt_id("Q"), "Q", a, [[a[0]["id"]], [a[1]["id"]]]).stored  # not marked as seen
    assert len(L.read_labels(tmp_path / "labels.jsonl")) == 2


def test_two_stores_on_one_folder_append_whole_lines_once(tmp_path):
    """Two stores (as two server processes would) appending at once, each submission sent by both: every line
    whole, every submission once."""
    stores = [L.LabelStore(tmp_path), L.LabelStore(tmp_path)]
    n = 40
    subs = []
    for i in range(n):
        a = answers(f"good {i}", f"bad {i}" + "!" * (i * 37 % 500))  # lines of varied length
        subs.append((L.prompt_id(f"prompt {i}"), f"prompt {i}", a, [[a[0]["id"]], [a[1]["id"]]]))
    stored = [0, 0]

    def work(k):
        for s in subs:
            stored[k] += stores[k].add_ranking(*s).stored

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(stored) == n
    recs = L.read_labels(tmp_path / "labels.jsonl")
    assert sorted(r["prompt"] for r in recs) == sorted(s[1] for s in subs)
    assert stores[0].labelled_prompt_ids() == stores[1].labelled_prompt_ids() == {s[0] for s in subs}


# ----------------------------------------------------------------------------- candidates


def test_candidates_file(tmp_path):
    f = tmp_path / "candidates.jsonl"
    c1 = {"prompt_id": "c1", "prompt": "P1", "answers": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]}
    c2 = {"prompt_id": "c2", "prompt": [{"role": "user", "content": "P2"}], "answers": [{"id": "a", "text": "z"}],
          "extra": "ignored"}
    f.write_text(json.dumps(c1) + "\n" + json.dumps(c2) + "\n")
    cands = L.read_candidates(f)
    assert cands == [c1, {k: v for k, v in c2.items() if k != "extra"}]
    assert L.next_unlabelled(cands, set()) == c1
    assert L.next_unlabelled(cands, {"c1"})["prompt_id"] == "c2"
    assert L.next_unlabelled(cands, set(), skip=["c1"])["prompt_id"] == "c2"
    assert L.next_unlabelled(cands, {"c1", "c2"}) is None
    f.write_text(json.dumps(c1) + "\n" + json.dumps(c1) + "\n")
    with pytest.raises(DataError, match=f"{f}:2: prompt_id 'c1' repeats the one at {f}:1"):
        L.read_candidates(f)
    f.write_text(json.dumps(c1) + "\n" + json.dumps({"prompt_id": "c3", "prompt": "P3"}) + "\n")
    with pytest.raises(DataError, match=f"{f}:2: missing field 'answers'"):
        L.read_candidates(f)


CRASHER = r"""
import sys
from chatforge.serve import labels as L
store = L.LabelStore(sys.argv[1])
a = [{"id": "x", "text": "yes " * 200}, {"id": "y", "text": "no " * 200}]
i = 0
while True:
    store.add_ranking(f"q{i}", f"prompt {i}", a, [["x"], ["y"]])
    i += 1
    print(i, flush=True)  # acknowledged: the line is written and fsynced
"""


def test_a_killed_writer_loses_nothing_acknowledged(tmp_path):
    """SIGKILL a process in the middle of appending: every acknowledged ranking is in the file, the file reads, and
    a restarted store appends after it."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    acked = 0
    try:
        for line in proc.stdout:
            acked = int(line)
            if acked >= 30:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    assert acked >= 30
    store = L.LabelStore(tmp_path)
    recs = L.read_labels(tmp_path / "labels.jsonl")
    assert len(recs) >= acked and store.labels.count == len(recs)
    assert [r["prompt_id"] for r in recs] == [f"q{i}" for i in range(len(recs))]
    a = recs[0]["answers"]
    assert store.add_ranking("after", "after the crash", a, [["y"], ["x"]]).stored
    assert L.read_labels(tmp_path / "labels.jsonl")[-1]["prompt_id"] == "after"


def test_the_pipeline_reads_what_the_page_writes(tmp_path):
    """A ranking of a candidate and one of a typed prompt (its own prompt and answers on the line) in one labels
    file: the pipeline's reader (chatforge.data.labels) takes both and expands them to the page's pairs."""
    from chatforge.data import labels as P

    cands = tmp_path / "candidates.jsonl"
    cand = P.make_candidate("Say hi.", ["Hi!", "Hello.", "Go away."])
    P.write_candidates(cands, [cand])
    store = L.LabelStore(tmp_path / "labels")
    c = cand.answers
    store.add_ranking(cand.prompt_id, cand.prompt, c, [[c[1]["id"]], [c[0]["id"]], [c[2]["id"]]])
    typed = answers("4", "Four.", "5")
    store.add_ranking(L.prompt_id("2 + 2?"), "2 + 2?", typed, [[typed[1]["id"], typed[0]["id"]], [typed[2]["id"]]])
    got = P.read_labels(store.labels.path, P.read_candidates(cands))
    assert [lb.prompt for lb in got] == ["Say hi.", "2 + 2?"]
    mine = [p for lb in got for p in P.label_pairs(lb)]
    page = [p for r in L.read_labels(store.labels.path) for p in L.ranking_to_pairs(r)]
    assert [(p["chosen"], p["rejected"]) for p in mine] == [(p["chosen"], p["rejected"]) for p in page] == [
        ("Hello.", "Hi!"), ("Hello.", "Go away."), ("Hi!", "Go away."), ("Four.", "5"), ("4", "5")]
    # a line naming neither a candidate nor carrying its own prompt and answers is still an error
    with open(store.labels.path, "a") as f:
        f.write(json.dumps({"prompt_id": "p-unknown", "ranking": [["x"]]}) + "\n")
    with pytest.raises(P.LabelsError, match=r"labels.jsonl:3: unknown prompt_id 'p-unknown'"):
        P.read_labels(store.labels.path, P.read_candidates(cands))
