import json

import pytest

from chatrlhf.data import Preference, as_conversations, load_records, parse_turns, split_by_prompt
from chatrlhf.data.split import group_key
from chatrlhf.errors import DataError
from conftest import EXAMPLES


def test_history_prefixed_lines_and_json_list_agree(write):
    lines = "User: Hi there\nAssistant: Hello!\nHow can I help?\nUser: Where is my order?"
    as_json = json.dumps([{"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello!\nHow can I help?"},
                          {"role": "user", "content": "Where is my order?"}])
    a = parse_turns(lines, "f", 2, "history")
    b = parse_turns(as_json, "f", 2, "history")
    assert a == b
    assert [m["role"] for m in a] == ["user", "assistant", "user"]
    assert a[1]["content"] == "Hello!\nHow can I help?"   # a line without prefix continues the turn
    assert parse_turns("just a question", "f", 2, "history") == [{"role": "user", "content": "just a question"}]
    assert parse_turns("Human: hi\nAssistant: yo\nHuman: ok", "f", 2, "h")[2] == {"role": "user", "content": "ok"}


def test_example_dialogues_load():
    loaded = load_records(EXAMPLES / "dialogue_history.csv")
    assert loaded.format == "dialogue_csv" and len(loaded.records) >= 36
    multi = [r for r in loaded.records if len(r.messages) >= 4]
    assert multi, "the examples must contain multi-turn dialogues"
    for r in loaded.records:
        assert r.messages[-1]["role"] == "assistant" and r.messages[-2]["role"] == "user"
        assert r.where.startswith(str(EXAMPLES / "dialogue_history.csv") + ":")


def test_example_feedback_files_load():
    prefs = load_records(EXAMPLES / "preferences.jsonl")
    assert prefs.format == "preference"
    assert sum(p.tie for p in prefs.records) == 1 and sum(p.both_bad for p in prefs.records) == 1
    ratings = load_records(EXAMPLES / "ratings.jsonl")
    assert {r.score for r in ratings.records if r.scale == "stars"} >= {1.0, 5.0}
    assert {(r.score, r.scale) for r in ratings.records if r.scale == "thumbs"} == {(1.0, "thumbs"), (-1.0, "thumbs")}
    corr = load_records(EXAMPLES / "corrections.jsonl")
    pref = corr.records[0].as_preference()
    assert pref.chosen == corr.records[0].corrected and pref.rejected == corr.records[0].response
    convs = as_conversations(corr)
    assert convs[0].messages[-1]["content"] == corr.records[0].corrected


def test_hh_transcript_conversion(write):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken...",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a joke\n\nAssistant: No."}
    p = write("hh.jsonl", json.dumps(row) + "\n" + json.dumps({**row, "rejected": row["chosen"]}) + "\n")
    loaded = load_records(p)
    assert loaded.format == "hh" and len(loaded.records) == 1       # identical pair reported and skipped
    assert "identical" in loaded.problems[0].message and loaded.problems[0].where.endswith(":2")
    pref = loaded.records[0]
    assert isinstance(pref, Preference)
    assert [m["role"] for m in pref.prompt] == ["user", "assistant", "user"]
    assert pref.chosen == "Why did the chicken..." and pref.rejected == "No."


def test_oasst_tree_top1_path(write):
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q?", "replies": [
        {"role": "assistant", "text": "second", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "follow-up", "replies": []}]},
        {"role": "assistant", "text": "synthetic", "rank": None, "synthetic": True, "replies": []}]}}
    loaded = load_records(write("t.jsonl", json.dumps(tree) + "\n"))
    assert loaded.format == "oasst_tree"
    # the trailing user turn is dropped; the best-ranked reply is kept
    assert loaded.records[0].messages == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "best"}]


def test_all_file_types_read_the_same_records(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"history": "User: hello", "responses": "hi"}, {"history": "User: bye", "responses": "ciao"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    want = [r.messages for r in load_records(tmp_path / "d.csv").records]
    for name in ("d.parquet", "d.jsonl", "d.json", "hfds"):
        assert [r.messages for r in load_records(tmp_path / name).records] == want, name


def test_format_can_be_forced(write):
    p = write("p.jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert load_records(p, "preference").format == "preference"
    with pytest.raises(DataError, match="field 'context': missing column"):
        load_records(p, "oasst_pairs")


def test_split_is_prompt_disjoint():
    loaded = load_records(EXAMPLES / "dialogue_history.csv")
    train, held = split_by_prompt(loaded.records, 0.2, seed=3)
    assert len(train) + len(held) == len(loaded.records) and held
    assert not {group_key(r) for r in train} & {group_key(r) for r in held}
    # every turn of one dialogue goes to the same side
    again = split_by_prompt(loaded.records, 0.2, seed=3)
    assert [r.where for r in again[1]] == [r.where for r in held]   # deterministic


# --------------------------------------------------------------------------- bad input


def assert_names(err: DataError, path, line, field):
    msg = str(err)
    assert str(path) in msg and f"{path}:{line}" in msg, msg
    if field:
        assert f"field '{field}'" in msg, msg


def test_missing_column(write):
    p = write("d.csv", "history,reply\n\"User: hi\",hello\n")
    with pytest.raises(DataError) as e:
        load_records(p, "dialogue_csv")
    assert_names(e.value, p, 2, "responses")


def test_unknown_columns_say_what_is_expected(write):
    p = write("d.csv", "question,answer\nhi,hello\n")
    with pytest.raises(DataError, match=r"d.csv:2: cannot tell the format.*history, responses"):
        load_records(p)


def test_empty_reply(write):
    p = write("d.csv", "history,responses\n\"User: hi\",hello\n\"User: second\",\"  \"\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert_names(e.value, p, 3, "responses")
    assert "empty reply" in str(e.value)


def test_multiline_csv_cells_keep_true_line_numbers(write):
    p = write("d.csv", 'history,responses\n"User: a\nAssistant: b\nUser: c",ok\n"User: d",\n')
    with pytest.raises(DataError) as e:
        load_records(p)
    assert_names(e.value, p, 5, "responses")


def test_bad_json_line(write):
    p = write("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: bad JSON") as e:
        load_records(p)
    assert "column" in str(e.value)


def test_non_utf8_bytes(write):
    p = write("d.csv", "history,responses\n\"User: hi\",ok\n\"User: caf".encode() + b"\xe9\",ok\n")
    with pytest.raises(DataError, match=r"d.csv:3: not valid UTF-8: byte 0xe9") as e:
        load_records(p)
    assert "UTF-8" in e.value.hint


def test_unknown_role(write):
    msgs = [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]
    p = write("d.jsonl", json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert_names(e.value, p, 1, "messages")
    assert "unknown role 'wizard' in message 2" in str(e.value)


def test_unknown_role_in_csv_history(write):
    hist = json.dumps([{"role": "robot", "content": "x"}]).replace('"', '""')
    p = write("d.csv", f'history,responses\n"{hist}",ok\n')
    with pytest.raises(DataError) as e:
        load_records(p)
    assert_names(e.value, p, 2, "history")


def test_conversation_ending_on_user_turn_for_sft(write):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]}
    p = write("d.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    loaded = load_records(p)  # fine as data (prompts) ...
    with pytest.raises(DataError) as e:  # ... but not for SFT
        as_conversations(loaded)
    assert_names(e.value, p, 2, "messages")
    assert "ends on a user turn" in str(e.value)


def test_history_ending_on_assistant(write):
    p = write("d.csv", 'history,responses\n"User: a\nAssistant: b",c\n')
    with pytest.raises(DataError, match="ends with an assistant turn") as e:
        load_records(p)
    assert_names(e.value, p, 2, "history")


@pytest.mark.parametrize("score", [7, 0, -1, "meh"])
def test_rating_out_of_range(write, score):
    p = write("r.jsonl", json.dumps({"prompt": "q", "response": "a", "score": score}) + "\n")
    with pytest.raises(DataError) as e:
        load_records(p)
    assert_names(e.value, p, 1, "score")


def test_collect_mode_reports_every_problem(write):
    p = write("d.csv", 'history,responses\n"User: a",\n"User: b",ok\n"User: c",\n')
    loaded = load_records(p, collect=True)
    assert len(loaded.records) == 1
    assert [x.where for x in loaded.problems] == [f"{p}:2", f"{p}:4"]


def test_hh_row_without_final_assistant_turn_is_reported_and_skipped(write):
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    bad = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: x\n\nHuman: more?"}
    p = write("hh.jsonl", json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    loaded = load_records(p)
    assert len(loaded.records) == 1
    assert loaded.problems[0].where == f"{p}:2" and "field 'rejected'" in loaded.problems[0].message
