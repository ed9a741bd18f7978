"""The formats users bring besides ours: TRL's prompt-only, prompt-completion, unpaired-preference and
conversational preference rows, and the OpenAssistant flat message export (trees rebuilt from parent_id) — each
read into the exact records expected, by every command that takes prompts, conversations or pairs."""
import gzip
import io
import json

import pytest

from chatrlhf.config import PPOConfig, RewardTrainConfig
from chatrlhf.data import Preference, Rating, as_conversations, load_prompts, load_records
from chatrlhf.data.inspect import inspect_file
from chatrlhf.episodes import load_dialogues
from chatrlhf.errors import DataError
from chatrlhf.evaluate.report import held_out
from chatrlhf.models import load_tokenizer
from chatrlhf.trainers.ppo import split_prompts
from chatrlhf.trainers.qoffline import load_logged
from chatrlhf.data.pairs import load_pairs
from chatrlhf.trainers.sft import load_conversations
from conftest import run_cli, tiny_sft_args


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def assert_names(err: DataError, path, line, field):
    assert f"{path}:{line}: field '{field}'" in str(err), str(err)


# --------------------------------------------------------------------------- TRL formats

PROMPT_ONLY = [{"prompt": "Where is my order?"},
               {"prompt": [{"role": "system", "content": "Be brief."}, U("Do you ship to Canada?")]}]


def test_prompt_only_rows_are_prompts(write):
    p = write("p.jsonl", jsonl(PROMPT_ONLY))
    loaded = load_records(p)  # was "cannot tell the format"
    assert (loaded.format, loaded.kind) == ("prompt_only", "prompt")
    want = [[U("Where is my order?")], [{"role": "system", "content": "Be brief."}, U("Do you ship to Canada?")]]
    assert [r.messages for r in loaded.records] == want and load_prompts(p) == want
    assert loaded.records[1].where == f"{p}:2"
    with pytest.raises(DataError, match="prompts only .*no replies to learn from"):
        as_conversations(loaded)  # SFT says why, instead of "ends on a user turn"


@pytest.mark.parametrize("name", ["p.csv", "p.json", "p.parquet", "p.parquet.gz", "p.jsonl.gz", "p.txt"])
def test_prompt_only_in_every_file_type(tmp_path, name):
    import pandas as pd

    rows = [{"prompt": "Where is my order?"}, {"prompt": "Do you ship to Canada?"}]
    path = tmp_path / name
    if name.endswith(".csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    elif ".parquet" in name:
        pd.DataFrame(rows).to_parquet(buf := io.BytesIO())
        path.write_bytes(gzip.compress(buf.getvalue()) if name.endswith(".gz") else buf.getvalue())
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl(rows).encode()))
    else:
        path.write_text("Where is my order?\nDo you ship to Canada?\n")
    loaded = load_records(path)
    assert loaded.format == "prompt_only"
    assert [r.messages for r in loaded.records] == [[U("Where is my order?")], [U("Do you ship to Canada?")]]


def test_prompt_completion_string_and_conversational(write, tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."},
            {"prompt": [U("Hi"), A("Hello!"), U("Colour of the sky?")], "completion": [A("Blue.")]}]
    want = [[U("The sky is"), A(" blue.")],  # the completion kept as written (continuations keep their space)
            [U("Hi"), A("Hello!"), U("Colour of the sky?"), A("Blue.")]]
    for p in (write("pc.jsonl", jsonl(rows)), tmp_path / "pc.parquet"):
        if p.suffix == ".parquet":
            import pandas as pd

            pd.DataFrame([{"prompt": json.dumps(r["prompt"]) if isinstance(r["prompt"], list) else r["prompt"],
                           "completion": r["completion"] if isinstance(r["completion"], str) else "Blue."}
                          for r in rows]).to_parquet(p)
        loaded = load_records(p)
        assert (loaded.format, loaded.kind) == ("prompt_completion", "conversation")
        assert [r.messages for r in loaded.records] == want
        assert all(r.last_only for r in loaded.records)  # TRL's completion-only loss: the prompt is context
        assert [c.messages for c in as_conversations(loaded)] == want
        assert load_prompts(p) == [w[:-1] for w in want]


def test_conversational_cells_in_csv(write):
    cell = lambda x: '"' + json.dumps(x).replace('"', '""') + '"'  # noqa: E731
    p = write("pc.csv", f"prompt,completion\n{cell([U('Hi')])},{cell([A('Hello!')])}\nHi,[1] is a footnote\n")
    assert [r.messages for r in load_records(p).records] == [[U("Hi"), A("Hello!")], [U("Hi"), A("[1] is a footnote")]]


def test_unpaired_preference_is_thumbs_ratings(write):
    rows = [{"prompt": "Where is my order?", "completion": "It ships today.", "label": True},
            {"prompt": [U("Where is my order?")], "completion": [A("No idea.")], "label": False},
            {"prompt": "Refund?", "completion": "Yes, within 30 days.", "label": "true", "annotator": "ann1"}]
    loaded = load_records(write("kto.jsonl", jsonl(rows)))
    assert (loaded.format, loaded.kind) == ("unpaired_preference", "rating")
    got = [(r.prompt, r.response, r.score, r.scale, r.annotator) for r in loaded.records]
    assert got == [([U("Where is my order?")], "It ships today.", 1.0, "thumbs", ""),
                   ([U("Where is my order?")], "No idea.", -1.0, "thumbs", ""),
                   ([U("Refund?")], "Yes, within 30 days.", 1.0, "thumbs", "ann1")]
    assert all(isinstance(r, Rating) for r in loaded.records)


def test_conversational_preference_rows(write):
    explicit = {"prompt": [U("Hi")], "chosen": [A("Hello! How can I help?")], "rejected": [A("What.")]}
    implicit = {"chosen": [U("Hi"), A("Hello! How can I help?")], "rejected": [U("Hi"), A("What.")]}
    for name, row in (("explicit.jsonl", explicit), ("implicit.jsonl", implicit)):
        [pref] = load_records(write(name, jsonl([row]))).records
        assert isinstance(pref, Preference)
        assert (pref.prompt, pref.chosen, pref.rejected) == ([U("Hi")], "Hello! How can I help?", "What.")


@pytest.mark.parametrize("row, field, says", [
    ({"prompt": [U("Hi"), A("Hel")], "completion": "lo"}, "prompt", "ends on an assistant turn"),
    ({"prompt": "Hi", "completion": [A("a"), A("b")]}, "completion", "expected one assistant message"),
    ({"prompt": "Hi", "completion": "  "}, "completion", "empty reply"),
    ({"prompt": "Hi", "completion": "Hello", "label": "maybe"}, "label", "expected true or false"),
    ({"chosen": [U("Hi"), A("a")], "rejected": [U("Bye"), A("b")]}, "rejected", "no shared prompt"),
    ({"prompt": ""}, "prompt", "empty prompt"),
])
def test_bad_trl_rows_name_file_line_and_field(write, row, field, says):
    p = write("bad.jsonl", jsonl([row]))
    with pytest.raises(DataError, match=says) as e:
        load_records(p)
    assert_names(e.value, p, 1, field)


# --------------------------------------------------------------------------- OpenAssistant flat export


def msg(mid, parent, role, text, rank=None, tree=None, **flags):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree or (parent or mid)[0] + "0",
            "role": role, "text": text, "rank": rank, "lang": "en", "deleted": False, "synthetic": False,
            "review_result": True, **flags}


# Two trees and an orphan, children before parents in places (exports need not be ordered).
#   a0 Q1 ─ a1 A-best (0) ─ a3 follow ─ a5 A-deep
#        ├ a2 A-second (1)
#        └ a4 A-deleted (2, deleted) ─ a6 under-deleted
#   b0 Q2 ─ b1 B-worse (1) · b2 B-best (0) · b3 B-unranked · b4 B-failed (2, review failed)
#   o1 (parent "gone" not in the file) ─ o2
FLAT = [msg("a1", "a0", "assistant", "A-best", 0),
        msg("a0", None, "prompter", "Q1"),
        msg("a2", "a0", "assistant", "A-second", 1),
        msg("a3", "a1", "prompter", "follow"),
        msg("a4", "a0", "assistant", "A-deleted", 2, deleted=True),
        msg("a5", "a3", "assistant", "A-deep"),
        msg("a6", "a4", "prompter", "under-deleted"),
        msg("b0", None, "prompter", "Q2"),
        msg("b1", "b0", "assistant", "B-worse", 1),
        msg("b2", "b0", "assistant", "B-best", 0),
        msg("b3", "b0", "assistant", "B-unranked"),
        msg("b4", "b0", "assistant", "B-failed", 2, review_result=False),
        msg("o1", "gone", "assistant", "orphan", 0, tree="x0"),
        msg("o2", "o1", "prompter", "orphan's child", tree="x0")]


@pytest.fixture
def flat(tmp_path):
    p = tmp_path / "oasst_messages.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl(FLAT).encode()))
    return p


def test_flat_export_rebuilds_trees_into_pairs_conversations_and_prompts(flat):
    loaded = load_records(flat)
    assert (loaded.format, loaded.kind) == ("oasst_flat", "preference")
    # ranked usable siblings, lower rank chosen; the deleted (rank 2) and failed-review (rank 2) replies are out
    assert [(r.prompt, r.chosen, r.rejected) for r in loaded.records] == [
        ([U("Q1")], "A-best", "A-second"), ([U("Q2")], "B-best", "B-worse")]
    assert loaded.records[0].where == f"{flat}:1 + 3" and loaded.records[0].source == "oasst"
    # top-1 path of each tree: best rank at each step, unranked after ranked
    assert [c.messages for c in as_conversations(loaded)] == [[U("Q1"), A("A-best"), U("follow"), A("A-deep")],
                                                              [U("Q2"), A("B-best")]]
    # every usable user turn with its history (the reply under the deleted message is not: it answers nothing kept)
    assert load_prompts(flat) == [[U("Q1")], [U("Q1"), A("A-best"), U("follow")], [U("Q2")]]
    # the orphan and its reply: skipped, one problem naming its line and field
    assert [(p.where, p.message) for p in loaded.problems] == [
        (f"{flat}:13", "field 'parent_id': gone is not in the file: this message and the 1 reply under it skipped")]


def test_flat_export_every_reply_view(flat):
    loaded = load_records(flat, "oasst_flat_all")
    convs = as_conversations(loaded)
    assert [c.messages for c in convs] == [
        [U("Q1"), A("A-best")], [U("Q1"), A("A-best"), U("follow"), A("A-deep")], [U("Q1"), A("A-second")],
        [U("Q2"), A("B-worse")], [U("Q2"), A("B-best")], [U("Q2"), A("B-unranked")]]
    assert all(c.last_only for c in convs)  # each human reply is a target once; shared history is context
    assert len(loaded.records) == 2  # the pairs do not depend on the path view


def test_flat_export_bad_rows(write):
    rows = [msg("a0", None, "prompter", "Q1"), msg("a1", "a0", "assistant", "A", 0)]
    cases = [(rows + [msg("a1", "a0", "assistant", "again")], 3, "message_id", "duplicate id"),
             (rows + [msg("a2", "a0", "robot", "x")], 3, "role", "expected 'prompter' or 'assistant'"),
             (rows + [msg("a2", "a0", "prompter", "x")], 3, "role", "a user message replies to a user message"),
             (rows + [msg("a2", "a0", "assistant", "x", "best")], 3, "rank", "expected a rank"),
             (rows + [msg("a2", "a0", "assistant", " ")], 3, "text", "empty assistant message"),
             ([msg("r", None, "assistant", "x")], 1, "role", "a tree must start with a prompter message")]
    for i, (bad, line, field, says) in enumerate(cases):
        p = write(f"bad{i}.jsonl", jsonl(bad))
        with pytest.raises(DataError, match=says) as e:
            load_records(p)
        assert_names(e.value, p, line, field)
        assert any(pr.where == f"{p}:{line}" for pr in load_records(p, collect=True).problems)


def test_flat_export_parent_cycle_is_skipped_and_reported(write):
    rows = [msg("a0", None, "prompter", "Q1"), msg("a1", "a0", "assistant", "A", 0),
            msg("c1", "c2", "prompter", "x"), msg("c2", "c1", "assistant", "y")]
    loaded = load_records(write("cycle.jsonl", jsonl(rows)), "oasst_flat")
    assert [c.messages for c in as_conversations(loaded)] == [[U("Q1"), A("A")]]
    assert [p.message for p in loaded.problems] == ["2 messages are not connected to a root prompt (their parent_ids "
                                                    "form a cycle): skipped"]


def test_nested_tree_gives_the_same_views(write):
    tree = {"message_tree_id": "t", "prompt": {"role": "prompter", "text": "Q?", "replies": [
        {"role": "assistant", "text": "second", "rank": 1, "replies": []},
        {"role": "assistant", "text": "best", "rank": 0, "replies": [
            {"role": "prompter", "text": "follow-up", "replies": []}]},
        {"role": "assistant", "text": "synthetic", "rank": 2, "synthetic": True, "replies": []}]}}
    p = write("t.jsonl", jsonl([tree]))
    loaded = load_records(p)
    assert loaded.kind == "conversation" and [r.messages for r in loaded.records] == [[U("Q?"), A("best")]]
    assert [(r.prompt, r.chosen, r.rejected) for r in loaded.of("preference")] == [([U("Q?")], "best", "second")]
    assert load_prompts(p) == [[U("Q?")], [U("Q?"), A("best"), U("follow-up")]]
    bad = write("bad.jsonl", jsonl([tree, {"message_tree_id": "u", "prompt": {"role": "prompter", "text": "Q",
                                           "replies": [{"role": "prompter", "text": "x"}]}}]))
    with pytest.raises(DataError) as e:
        load_records(bad)
    assert_names(e.value, bad, 2, "prompt.replies[0].role")


# --------------------------------------------------------------------------- data inspect, and each command


def test_data_inspect_on_each_format(flat, write):
    tok = load_tokenizer("tiny-random-llama")
    files = {"prompt_only": write("p.jsonl", jsonl(PROMPT_ONLY)),
             "prompt_completion": write("pc.jsonl", jsonl([{"prompt": "Hi", "completion": "Hello"}])),
             "unpaired_preference": write("k.jsonl", jsonl([{"prompt": "Hi", "completion": "Yo", "label": False}]))}
    for fmt, path in files.items():
        report = inspect_file(path, "auto", tok, 512)
        assert report["format"] == fmt and report["records"] == 1 + (fmt == "prompt_only") and not report["problems"]
    assert report["ratings"] == {"thumbs_up": 0, "thumbs_down": 1, "stars": 0}
    report = inspect_file(flat, "auto", tok, 512)
    assert (report["format"], report["kind"], report["records"], report["trees"]) == ("oasst_flat", "preference", 2, 2)
    assert list(report["views"].values()) == [2, 2, 3]
    assert any("gone is not in the file" in p for p in report["problems"])


def test_every_command_reads_the_new_formats(flat, write):
    prompts = write("p.jsonl", jsonl(PROMPT_ONLY))
    pc = write("pc.jsonl", jsonl([{"prompt": "Hi", "completion": "Hello"}]))
    kto = write("k.jsonl", jsonl([{"prompt": "Hi", "completion": "Hello!", "label": True},
                                  {"prompt": "Hi", "completion": "Go away.", "label": False}]))
    convs, formats = load_conversations([str(flat), str(pc)], "auto")  # sft
    assert len(convs) == 3 and formats == "oasst_flat,prompt_completion"
    pairs, counts = load_pairs([str(flat), str(kto)], RewardTrainConfig(), log=lambda *_: None)  # reward train
    assert [(p.chosen, p.rejected) for p in pairs] == [("A-best", "A-second"), ("B-best", "B-worse"),
                                                        ("Hello!", "Go away.")]  # thumbs up ≻ down
    train, held = split_prompts(PPOConfig(data=[str(prompts), str(flat)], eval_fraction=0.0))  # ppo
    assert len(train) == 5 and held == []
    assert load_dialogues([str(flat)], "auto") == [c.messages for c in as_conversations(load_records(flat))]  # qlearn
    assert [p for p, _ in held_out([str(prompts)])] == load_prompts(prompts)  # eval
    feedback, _ = load_logged([str(kto)], "auto")  # qlearn-offline: thumbs are rewards
    assert [(t.reply, t.reward) for t in feedback] == [("Hello!", 1.0), ("Go away.", -1.0)]


def test_sft_cli_trains_on_the_flat_export(flat, tmp_path):
    r = run_cli(*tiny_sft_args(flat, tmp_path / "out", "--max-steps", "1", "--eval-fraction", "0",
                               "--batch-size", "2"))
    assert r.returncode == 0, r.stderr
    assert "oasst_flat data, 2 train / 0 eval examples" in r.stdout + r.stderr


def test_a_row_with_a_reply_column_but_no_full_signature_is_refused_not_read_as_a_prompt(tmp_path):
    """`{"prompt", "chosen"}` is a preference missing `rejected` (a broken record), never TRL's prompt-only."""
    from chatrlhf.data.formats import prompts_only

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: cannot tell the format from columns \['chosen', 'prompt'\]"):
        load_records(bad)
    assert not prompts_only(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "x", "id": 7}) + "\n")
    assert prompts_only(ok) and [r.prompt for r in load_records(ok).records] == [[{"role": "user", "content": "x"}]]
