"""Export: lossless rows (ties, both-bad, confidence, annotator, reliability weights), corrections as pairs and
SFT rows, aggregation rules computed by hand, a prompt-disjoint split, a manifest whose hash names the data —
and the exported files train `chatrlhf reward train` and `chatrlhf sft` as they are."""

import json
import math

import pytest

from chatrlhf.data.formats import load_records
from chatrlhf.data.records import Conversation, Preference, Rating
from chatrlhf.feedback.export import export
from chatrlhf.feedback.store import Store, content_hash
from conftest import run_cli


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture
def filled(tmp_path):
    """Annotators a, b, c. Gold item (answer a): a right, b wrong → reliability a 2/3, b 1/3, c 1/2 (untested).
    X (k 3): votes a, a, b. Y (k 2): tie (confidence 0.8), both bad. R: 4 stars. C1–C3: corrections by c."""
    store = Store(str(tmp_path / "fb.db"))
    a, b, c = (store.add_user(n, "correct horse").id for n in "abc")

    def compare(prompt, k, gold=None):
        pid = store.add_prompt([{"role": "user", "content": prompt}])
        return store.add_item("compare", store.add_reply(pid, f"A to {prompt}", model="m1"),
                              store.add_reply(pid, f"B to {prompt}", model="m2"), k=k, gold=gold)

    def single(kind, prompt):
        pid = store.add_prompt([{"role": "user", "content": prompt}])
        return store.add_item(kind, store.add_reply(pid, f"reply to {prompt}"))

    gold, x, y = compare("gold", 2, gold={"choice": "a"}), compare("x", 3), compare("y", 2)
    r = single("rate", "r")
    fixes = [single("correct", f"c{i}") for i in range(3)]

    def answer(user, item, **kw):
        store.lease(user)  # the next item for the user is the one intended here (items are offered in id order)
        assert store.submit(user, item, **kw)[1]

    answer(a, gold, choice="a"), answer(b, gold, choice="b")
    answer(a, x, choice="a"), answer(b, x, choice="a"), answer(c, x, choice="b")
    answer(a, y, choice="tie", confidence=0.8), answer(b, y, choice="both_bad")
    answer(a, r, score=4)
    for i, item in enumerate(fixes):
        answer(c, item, corrected=f"A much better reply {i}.")
    return store, tmp_path


def test_all_votes_are_exported_losslessly(filled):
    store, tmp = filled
    m = export(store, tmp / "exp", rule="all")
    prefs = rows(tmp / "exp" / "preferences.jsonl")
    votes = [p for p in prefs if p["source"] == "feedback"]
    assert len(votes) == 5 and not any(p["prompt"][0]["content"] == "gold" for p in prefs)  # gold items stay out
    weight = {p["annotator"]: p["weight"] for p in votes}
    assert weight == {"a": pytest.approx(2 / 3, abs=1e-6), "b": pytest.approx(1 / 3, abs=1e-6), "c": 0.5}
    by_c = next(p for p in votes if p["annotator"] == "c")
    assert (by_c["chosen"], by_c["rejected"], by_c["chosen_model"]) == ("B to x", "A to x", "m2")
    tie = next(p for p in votes if p["tie"])
    assert tie["confidence"] == 0.8 and not tie["both_bad"] and tie["annotator"] == "a"
    assert sum(p["both_bad"] for p in votes) == 1
    fixes = [p for p in prefs if p["source"] == "correction"]
    assert [(p["chosen"], p["rejected"]) for p in fixes][0] == ("A much better reply 0.", "reply to c0")
    assert rows(tmp / "exp" / "ratings.jsonl")[0]["score"] == 4
    sft = rows(tmp / "exp" / "conversations.jsonl")
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "A much better reply 0."}
    assert m["counts"] == {"preferences": 8, "ratings": 1, "corrections": 3, "conversations": 3}
    files = [tmp / "exp" / f"{n}.jsonl" for n in m["counts"]]
    assert m["sha256"] == content_hash(files) == json.loads((tmp / "exp" / "manifest.json").read_text())["sha256"]
    # the records load back as the project's types, nothing dropped
    loaded = load_records(tmp / "exp" / "preferences.jsonl").records
    assert len(loaded) == 8 and all(isinstance(p, Preference) for p in loaded)
    assert sum(p.tie for p in loaded) == 1 and sum(p.both_bad for p in loaded) == 1
    assert isinstance(load_records(tmp / "exp" / "ratings.jsonl").records[0], Rating)
    assert all(isinstance(c, Conversation) for c in load_records(tmp / "exp" / "conversations.jsonl").records)


def test_majority_and_bradley_terry_rules_hand_computed(filled):
    store, tmp = filled
    export(store, tmp / "maj", rule="majority")
    x = next(p for p in rows(tmp / "maj" / "preferences.jsonl") if p["prompt"][0]["content"] == "x")
    assert x["chosen"] == "A to x" and x["weight"] == pytest.approx(2 / 3, abs=1e-6) and x["votes"] == {"a": 2, "b": 1}
    export(store, tmp / "bt", rule="bt")
    bt = {p["prompt"][0]["content"]: p for p in rows(tmp / "bt" / "preferences.jsonl") if p["source"] == "feedback"}
    # x: a-wins weighted 2/3 + 1/3 = 1 of 1.5 → p = (1 + ½)/(1.5 + 1) = 0.6, margin = log(0.6/0.4)
    assert bt["x"]["p_a"] == pytest.approx(0.6) and bt["x"]["margin"] == pytest.approx(math.log(1.5), abs=1e-5)
    # y: a tie (weight 2/3) is half a win, both-bad abstains → p = (1/3 + ½)/(2/3 + 1) = 0.5 → tie
    assert bt["y"]["tie"] and bt["y"]["p_a"] == pytest.approx(0.5)


def test_split_is_prompt_disjoint_and_a_rerun_replaces_the_export(filled):
    store, tmp = filled
    m = export(store, tmp / "exp", eval_fraction=0.4, seed=1)
    keys = {}
    for split in ("train", "eval"):
        keys[split] = {json.dumps(r.get("prompt") or r["messages"][:-1]) for name in ("preferences", "ratings")
                       for r in rows(tmp / "exp" / split / f"{name}.jsonl")}
    assert keys["train"] and keys["eval"] and not keys["train"] & keys["eval"]
    assert m["counts"]["train/preferences"] + m["counts"]["eval/preferences"] == 8
    export(store, tmp / "exp")
    assert not (tmp / "exp" / "train").exists() and not (tmp / "exp.old").exists()


def test_an_export_trains_reward_and_sft_with_no_conversion(filled):
    store, tmp = filled
    export(store, tmp / "exp")
    r = run_cli("reward", "train", "--model", "tiny-random-llama", "--data", tmp / "exp" / "preferences.jsonl",
                "--output-dir", tmp / "rm", "--quiet", "--no-tensorboard", "--eval-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert (tmp / "rm" / "config.json").exists() and (tmp / "rm" / "eval.json").exists()
    r = run_cli("sft", "--model", "tiny-random-llama", "--data", tmp / "exp" / "conversations.jsonl", "--output-dir",
                tmp / "sft", "--quiet", "--no-tensorboard", "--max-steps", "2", "--eval-fraction", "0")
    assert r.returncode == 0, r.stderr
    assert (tmp / "sft" / "config.json").exists()
