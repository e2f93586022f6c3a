"""Text-level data readers: record files, SFT conversations, preference pairs, prompts."""

import gzip
import json

import pytest

from chatforge.data.conversations import read_conversations
from chatforge.data.preferences import read_preferences
from chatforge.data.prompts import read_prompts
from chatforge.data.records import (
    DataError,
    SkipCounter,
    expand_paths,
    fingerprint,
    iter_records,
    split_train_val,
)

U = lambda s: {"role": "user", "content": s}  # noqa: E731
A = lambda s: {"role": "assistant", "content": s}  # noqa: E731
S = lambda s: {"role": "system", "content": s}  # noqa: E731


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def assert_error(exc_info, path, line, *words):
    """The DataError names the file, the line and the problem."""
    e = exc_info.value
    assert e.file == str(path)
    assert e.line == line
    msg = str(e)
    assert msg.startswith(f"{path}:{line}: " if line is not None else f"{path}: ")
    for w in words:
        assert w in msg, (w, msg)


# ----------------------------------------------------------------------------- real files


def test_real_sft_files(shared_data):
    sft = shared_data / "sft"
    instances = sum(len(json.loads(l)["instances"]) for l in open(sft / "self_instruct_seed_tasks.jsonl"))
    expected = {"alpaca_en_demo.json": 999, "identity.json": 91, "self_instruct_seed_tasks.jsonl": instances}
    assert sorted(p.name for p in sft.iterdir()) == sorted(expected)  # every file is covered
    for name, n in expected.items():
        convs = read_conversations(sft / name)
        assert len(convs) == n, name
        assert not convs.skips
        for c in convs:
            assert c.messages[0]["role"] == "user" and c.messages[-1]["role"] == "assistant"
    a = read_conversations(sft / "alpaca_en_demo.json")
    assert a[0].messages == [U("Describe a process of making crepes."), A(a[0].messages[1]["content"])]
    assert a[0].messages[1]["content"].startswith("Making crepes is an easy and delicious process!")
    assert a[0].source == f"{sft / 'alpaca_en_demo.json'}:2"  # the line where the first element starts
    assert a[1].source == f"{sft / 'alpaca_en_demo.json'}:7"
    folder = read_conversations(sft)  # a folder reads all files, sorted
    assert len(folder) == sum(expected.values())
    assert folder[0].source == a[0].source


def test_real_hh_rlhf(shared_data):
    path = shared_data / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
    with pytest.raises(DataError) as ei:  # strict by default: the file has 9 flawed pairs
        read_preferences(path)
    assert_error(ei, path, 87, "empty chosen response")
    pairs = read_preferences(path, strict=False)
    assert pairs.skips.seen == 2312
    assert pairs.skips.as_dict() == {"prompts differ": 5, "empty response": 4}
    assert len(pairs) == 2312 - 9
    assert pairs.skips.examples["empty response"][0] == f"{path}:87"
    for p in pairs:
        assert p.prompt[0]["role"] == "user" and p.prompt[-1]["role"] == "user"
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
    # consecutive turns of one role are kept (documented); the file has 4 such prompts
    alternating = [all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(p.prompt))
                   for p in pairs]
    assert alternating.count(False) == 4
    first = pairs[0]
    assert first.source == f"{path}:1"
    assert first.prompt[:2] == [U("what are some pranks with a pen i can do?"), A("Are you looking for practical joke ideas?")]
    assert first.prompt[-1] == U("okay some of these do not have anything to do with pens")
    assert first.chosen.startswith("No, sorry!  All of these involve a pen")
    assert first.rejected.startswith("There are lots of funny things you can do with pens")


def test_real_dpo_demo(shared_data):
    pairs = read_preferences(shared_data / "preference" / "dpo_en_demo.json")
    assert len(pairs) == 300 and not pairs.skips
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 80
    assert all(p.prompt[-1]["role"] == "user" and p.chosen and p.rejected for p in pairs)
    assert pairs[0].prompt == [U("Hi! I'd like to create a new language game simulating the first person "
                                 "perspective of a character named Angela.")]
    assert pairs[0].chosen.startswith("That sounds like a fun and engaging idea!")


@pytest.mark.parametrize("name,n", [("oasst_prompt_lottery_en_250_text.jsonl", 250), ("oasst_en_100_text.jsonl", 100)])
def test_real_prompt_files(shared_data, name, n):
    prompts = read_prompts(shared_data / "prompts" / name)
    assert len(prompts) == n
    assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in prompts)
    if n == 250:
        assert prompts[0].messages == [U("Can you tell me about GLaDOS?")]


# ----------------------------------------------------------------------------- records


def test_iter_records_formats(tmp_path):
    recs = [{"a": 1}, "plain", {"b": [1, 2]}]
    jl = tmp_path / "x.jsonl"
    jl.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n" + json.dumps(recs[2]) + "\n")
    assert list(iter_records(jl)) == [(1, recs[0]), (3, recs[1]), (4, recs[2])]  # blank line is no record
    gz = tmp_path / "x.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    assert list(iter_records(gz)) == [(1, recs[0]), (2, recs[1]), (3, recs[2])]
    js = tmp_path / "x.json"
    js.write_text(json.dumps(recs, indent=2))
    assert list(iter_records(js)) == [(2, recs[0]), (5, recs[1]), (6, recs[2])]  # start line of each element
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(iter_records(tmp_path / "e.json")) == []


def test_iter_records_invalid_json(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError) as ei:
        list(iter_records(jl))
    assert_error(ei, jl, 3, "invalid JSON")
    js = tmp_path / "bad.json"
    js.write_text('[\n  {"a": 1},\n  {"a": 2,}\n]\n')
    with pytest.raises(DataError) as ei:
        list(iter_records(js))
    assert_error(ei, js, 3, "invalid JSON")
    js.write_text('[\n  {"a": 1}\n  {"a": 2}\n]\n')  # missing comma
    with pytest.raises(DataError) as ei:
        list(iter_records(js))
    assert_error(ei, js, 3, "invalid JSON", "','")
    js.write_text('{"a": 1}')
    with pytest.raises(DataError) as ei:
        list(iter_records(js))
    assert_error(ei, js, 1, "JSON array")


def test_expand_paths_and_fingerprint(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.json", "sub/c.jsonl.gz", "notes.txt", ".hidden.jsonl"):
        (d / name).write_bytes(b"[]")
    assert [p.relative_to(d).as_posix() for p in expand_paths([str(d)])] == ["a.json", "b.jsonl", "sub/c.jsonl.gz"]
    assert expand_paths([d / "b.jsonl", d, d / "b.jsonl"])[0].name == "b.jsonl"
    assert len(expand_paths([d / "b.jsonl", d])) == 3  # deduplicated
    with pytest.raises(DataError) as ei:
        expand_paths([tmp_path / "missing.jsonl"])
    assert_error(ei, tmp_path / "missing.jsonl", None, "no such file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as ei:
        expand_paths([tmp_path / "empty"])
    assert_error(ei, tmp_path / "empty", None, "no data files")
    with pytest.raises(DataError) as ei:
        expand_paths([d / "notes.txt"])
    assert_error(ei, d / "notes.txt", None, "unsupported file type")

    f1 = fingerprint([d])
    assert len(f1) == 64 and f1 == fingerprint(str(d))
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in d.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(d)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(d)).write_bytes(p.read_bytes())
    assert fingerprint([copy]) == f1  # location-independent
    (copy / "a.json").write_bytes(b"[ ]")
    assert fingerprint([copy]) != f1  # content-dependent
    (copy / "a.json").write_bytes(b"[]")
    (copy / "a.json").rename(copy / "z.json")
    assert fingerprint([copy]) != f1  # name-dependent


def test_split_train_val():
    items = list(range(100))
    train, val = split_train_val(items, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == items and train == sorted(train) and val == sorted(val)
    assert split_train_val(items, 0.1, seed=3) == (train, val)  # deterministic
    assert split_train_val(items, 0.1, seed=4)[1] != val
    assert split_train_val(items[:5], 0.01, seed=0)[1].__len__() == 1  # at least one held out
    assert split_train_val(items, 0.0, seed=0) == (items, [])
    with pytest.raises(ValueError):
        split_train_val(items, 1.0, seed=0)
    with pytest.raises(ValueError):
        split_train_val([1], 0.5, seed=0)


def test_skip_counter_summary():
    s = SkipCounter(max_examples=2)
    assert not s and s.summary() == "no records skipped"
    for i in range(3):
        s.add("empty response", f"f.jsonl:{i + 1}")
    s.add("prompts differ", "f.jsonl:9")
    s.seen = 10
    assert s.total == 4 and s.as_dict() == {"empty response": 3, "prompts differ": 1}
    assert s.summary() == ("skipped 4 of 10 records; empty response: 3 (e.g. f.jsonl:1, f.jsonl:2); "
                           "prompts differ: 1 (e.g. f.jsonl:9)")


# ----------------------------------------------------------------------------- conversations


def test_conversation_formats(tmp_path):
    recs = [
        {"messages": [S("be brief"), U("hi"), A("hello")]},
        {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                           {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}], "system": "sys"},
        {"instruction": "Add.", "input": "2+2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "And now?", "input": "", "output": "a3", "system": "s",
         "history": [["q1", "a1"], ["q2", "a2"]]},
        {"prompt": "p", "response": "r"},
        {"prompt": "p", "completion": "c"},
        {"prompt": [U("p")], "completion": [A("c1"), U("more"), A("c2")]},
        {"instruction": "Classify.", "instances": [{"input": "x", "output": "A"}, {"input": "", "output": "B"}]},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    convs = read_conversations([path])
    got = [c.messages for c in convs]
    assert got == [
        [S("be brief"), U("hi"), A("hello")],
        [S("sys"), U("q1"), A("a1"), U("q2"), A("a2")],
        [U("Add.\n\n2+2"), A("4")],
        [U("Say hi."), A("hi")],
        [S("s"), U("q1"), A("a1"), U("q2"), A("a2"), U("And now?"), A("a3")],
        [U("p"), A("r")],
        [U("p"), A("c")],
        [U("p"), A("c1"), U("more"), A("c2")],
        [U("Classify.\n\nx"), A("A")],
        [U("Classify."), A("B")],
    ]
    assert [c.source for c in convs[-3:]] == [f"{path}:8", f"{path}:9#0", f"{path}:9#1"]
    js = tmp_path / "sft.json"  # the same records as a JSON array
    js.write_text(json.dumps(recs, indent=1))
    assert [c.messages for c in read_conversations(js)] == got


BAD_CONVERSATIONS = [
    ({"text": "hello"}, "unknown SFT record format", "known formats"),
    ({"messages": [U("hi"), {"role": "bot", "content": "x"}]}, "unknown role 'bot'", "messages[1]"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}, "unknown role 'robot'"),
    ({"messages": [A("hello"), U("hi"), A("x")]}, "starts with the assistant"),
    ({"messages": [S("s"), A("hello")]}, "starts with the assistant"),
    ({"messages": [U("hi"), U("anyone?")]}, "no assistant turn"),
    ({"messages": [U("hi"), A("  ")]}, "empty assistant response"),
    ({"instruction": "Say.", "input": "", "output": ""}, "empty assistant response"),
    ({"messages": [U("hi"), {"role": "assistant", "content": ["x"]}]}, "content must be a string"),
    ({"instruction": "Say.", "output": 3}, "'output' must be a string"),
    ({"messages": [U("hi"), A("a"), U("bye")]}, "ends with a user turn"),
    ({"messages": [U("hi"), A("a"), S("late")]}, "system message after the first turn"),
    ("just a string", "expected a JSON object"),
]


@pytest.mark.parametrize("bad", BAD_CONVERSATIONS, ids=lambda b: b[1])
def test_conversation_errors(tmp_path, bad):
    rec, *words = bad
    good = {"messages": [U("hi"), A("hello")]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, rec, good])
    with pytest.raises(DataError) as ei:
        read_conversations(path)
    assert_error(ei, path, 3, *words)
    convs = read_conversations(path, strict=False)  # the lenient policy: skipped and counted
    assert len(convs) == 3 and convs.skips.total == 1 and convs.skips.examples[ei.value.reason] == [f"{path}:3"]


def test_conversation_errors_in_json_array(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"messages": [{"role": "user", "content": "hi"},\n'
                    '                {"role": "assistant", "content": "x"}]},\n'
                    '  {"messages": [{"role": "user", "content": "hi"}]}\n]\n')
    with pytest.raises(DataError) as ei:
        read_conversations(path)
    assert_error(ei, path, 4, "no assistant turn")  # the line where the bad element starts


def test_nothing_usable_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [U("hi")]}])
    with pytest.raises(DataError, match="no usable conversations"):
        read_conversations(path, strict=False)


# ----------------------------------------------------------------------------- preferences


def hh(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_preference_formats(tmp_path):
    recs = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": [S("s"), U("p")], "chosen": [A("good")], "rejected": [A("bad")]},
        {"chosen": [U("p"), A("x"), U("q"), A("good")], "rejected": [U("p"), A("x"), U("q"), A("bad")]},
        {"prompt": "p", "chosen": [U("p"), A("good")], "rejected": [U("p"), A("bad")]},  # UltraFeedback style
        {"chosen": hh("p", "x", "q", "good"), "rejected": hh("p", "x", "q", "bad")},
        {"conversations": [{"from": "human", "value": "p"}], "system": "s",
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
        {"prompt": "p", "chosen": "same", "rejected": " same "},  # identical: always skipped
    ]
    path = write_jsonl(tmp_path / "pref.jsonl", recs)
    pairs = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([U("p")], "good", "bad"),
        ([S("s"), U("p")], "good", "bad"),
        ([U("p"), A("x"), U("q")], "good", "bad"),
        ([U("p")], "good", "bad"),
        ([U("p"), A("x"), U("q")], "good", "bad"),
        ([S("s"), U("p")], "good", "bad"),
    ]
    assert pairs[4].source == f"{path}:5"
    assert pairs.skips.as_dict() == {"identical chosen and rejected": 1}
    assert pairs.skips.examples["identical chosen and rejected"] == [f"{path}:7"]


BAD_PREFERENCES = [
    ({"prompt": "p", "chosen": "good"}, "no 'rejected'"),
    ({"prompt": "p", "rejected": "bad"}, "no 'chosen'"),
    ({"text": "p"}, "unknown preference record format"),
    ({"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"}, "chosen transcript has no assistant turn"),
    ({"chosen": hh("p", "good"), "rejected": hh("other", "bad")}, "prompts differ"),
    ({"chosen": [U("p"), A("good")], "rejected": [U("q"), A("bad")]}, "prompts differ"),
    ({"chosen": hh("p", " "), "rejected": hh("p", "bad")}, "empty chosen response"),
    ({"chosen": "good", "rejected": "bad"}, "no 'prompt'"),
    ({"prompt": [U("p"), A("a")], "chosen": "good", "rejected": "bad"}, "does not end with a user turn"),
    ({"prompt": "p", "chosen": [U("p")], "rejected": [A("bad")]}, "'chosen' does not end with an assistant"),
    ({"prompt": 5, "chosen": "good", "rejected": "bad"}, "'prompt' must be a string"),
]


@pytest.mark.parametrize("bad", BAD_PREFERENCES, ids=lambda b: b[1])
def test_preference_errors(tmp_path, bad):
    rec, *words = bad
    good = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, rec])
    with pytest.raises(DataError) as ei:
        read_preferences(path)
    assert_error(ei, path, 2, *words)
    pairs = read_preferences(path, strict=False)
    assert len(pairs) == 1 and pairs.skips.total == 1


def test_preference_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n')
    with pytest.raises(DataError) as ei:
        read_preferences(path)
    assert_error(ei, path, 2, "invalid JSON")
    pairs = read_preferences(path, strict=False)  # a .jsonl line that is not JSON: a counted skip
    assert len(pairs) == 1 and pairs.skips.as_dict() == {"invalid JSON": 1}
    assert pairs.skips.seen == 2 and pairs.skips.examples["invalid JSON"] == [f"{path}:2"]


def test_strict_false_skips_and_counts_lines_that_are_not_json(tmp_path, caplog):
    conv = {"messages": [U("q"), A("a")]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(conv) + "\nnot json at all\n\n" + json.dumps(conv) + '\n{"messages": [\n'
                    + json.dumps({"messages": [A("starts with the assistant")]}) + "\n")
    with pytest.raises(DataError) as ei:
        read_conversations(path)
    assert_error(ei, path, 2, "invalid JSON")
    with caplog.at_level("WARNING", logger="chatforge.data"):
        convs = read_conversations(path, strict=False)
    assert len(convs) == 2 and [c.source for c in convs] == [f"{path}:1", f"{path}:4"]
    assert convs.skips.seen == 5  # every non-blank line is counted, usable or not
    assert convs.skips.counts["invalid JSON"] == 2 and convs.skips.examples["invalid JSON"] == [f"{path}:2", f"{path}:5"]
    assert convs.skips.total == 3  # + the conversation that starts with the assistant
    assert "invalid JSON: 2" in caplog.text  # reported, not silent
    prompts = read_prompts(path, strict=False)
    assert len(prompts) == 2 and prompts.skips.counts["invalid JSON"] == 2
    js = tmp_path / "broken.json"  # inside a JSON array the reader cannot resynchronise: always an error
    js.write_text('[\n  {"prompt": "p"},\n  {"prompt": \n]\n')
    with pytest.raises(DataError) as ei:
        read_prompts(js, strict=False)
    assert_error(ei, js, 4, "invalid JSON")  # where the decoder met "]" instead of a value


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_non_utf8_file_names_the_line(tmp_path, suffix):
    body = ('[\n"a"\n,"b"\n,"\xff"\n]\n' if suffix == ".json" else '"a"\n"b"\n\n"x\xff"\n').encode("latin-1")
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(gzip.compress(body) if suffix.endswith(".gz") else body)
    with pytest.raises(DataError) as ei:
        read_prompts(path, strict=False)  # not a record problem: an error under every policy
    assert_error(ei, path, 4, "not UTF-8", "column")


def test_whole_file_errors_print_no_line_zero(tmp_path):
    e = DataError(tmp_path / "corpus.txt", 0, "no such file or folder")
    assert str(e) == f"{tmp_path / 'corpus.txt'}: no such file or folder" and e.line is None
    from chatforge.data.pretrain import corpus_files

    with pytest.raises(DataError) as ei:
        corpus_files([str(tmp_path / "missing.txt")])
    assert ":0:" not in str(ei.value) and str(ei.value).startswith(f"{tmp_path / 'missing.txt'}: ")


# ----------------------------------------------------------------------------- prompts


def test_prompt_formats(tmp_path):
    recs = [
        "plain question",
        {"prompt": "p"},
        {"prompt": [S("s"), U("p")]},
        {"messages": [U("q"), A("reference answer")]},  # the final assistant turn is dropped
        {"messages": [U("q1"), A("a1"), U("q2")]},
        {"conversations": [{"from": "human", "value": "q"}]},
        {"chosen": hh("p", "x", "q", "answer"), "rejected": hh("p", "x", "q", "other")},
        {"instruction": "Add.", "input": "2+2", "output": "4"},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", recs)
    prompts = read_prompts(path)
    assert [p.messages for p in prompts] == [
        [U("plain question")],
        [U("p")],
        [S("s"), U("p")],
        [U("q")],
        [U("q1"), A("a1"), U("q2")],
        [U("q")],
        [U("p"), A("x"), U("q")],
        [U("Add.\n\n2+2")],
    ]
    assert [p.source for p in prompts][:2] == [f"{path}:1", f"{path}:2"]


BAD_PROMPTS = [
    ("", "empty final user turn"),
    ({"prompt": "  "}, "empty final user turn"),
    ({"question": "p"}, "unknown prompt record format"),
    ({"messages": [A("hello"), U("hi")]}, "starts with the assistant"),
    ({"messages": [A("hello")]}, "prompt is empty"),
    ({"messages": [U("hi"), {"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"prompt": [U("p"), A("a"), A("b")]}, "does not end with a user turn"),
    (7, "expected a JSON string or object"),
]


@pytest.mark.parametrize("bad", BAD_PROMPTS, ids=lambda b: b[1])
def test_prompt_errors(tmp_path, bad):
    rec, *words = bad
    path = write_jsonl(tmp_path / "bad.jsonl", ["fine", rec])
    with pytest.raises(DataError) as ei:
        read_prompts(path)
    assert_error(ei, path, 2, *words)
    prompts = read_prompts(path, strict=False)
    assert len(prompts) == 1 and prompts.skips.total == 1
