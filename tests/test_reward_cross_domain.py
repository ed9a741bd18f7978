"""Cross-domain accuracy in benchmarks/reward_recipes.py (issue 21, item 2): the OpenAssistant split (both files,
deduplicated, whole prompts held out), the per-pair scoring of both test sets, and the script end to end on the
tiny model."""
import json
import sys

import pytest

from chatrlhf.data.split import group_key
from conftest import ROOT, SHARED_DATA

sys.path.insert(0, str(ROOT / "benchmarks"))
import reward_quality  # noqa: E402
import reward_recipes  # noqa: E402


def flat_message(mid, parent, role, text, rank=None):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": "t", "role": role, "text": text,
            "rank": rank, "deleted": False, "synthetic": False, "review_result": True}


@pytest.fixture
def oasst_files(tmp_path):
    """A flat export (tree A: 3 ranked replies → 3 pairs; tree B: 2 → 1 pair) and a rank-pairs file that repeats
    A's best-vs-second pair (whitespace aside) and adds tree C's 2 pairs: 6 distinct pairs of 3 prompts."""
    flat = [flat_message("a", None, "prompter", "Prompt A?"),
            *(flat_message(f"a{i}", "a", "assistant", f"A reply {i}", rank=i) for i in range(3)),
            flat_message("b", None, "prompter", "Prompt B?"),
            *(flat_message(f"b{i}", "b", "assistant", f"B reply {i}", rank=i) for i in range(2))]
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    pairs = [{"context": user("Prompt A?"), "chosen": "A reply 0 ", "rejected": "A reply 1"},
             {"context": user("Prompt C?"), "chosen": "C reply 0", "rejected": "C reply 1"},
             {"context": user("Prompt C?"), "chosen": "C reply 0", "rejected": "C reply 2"}]
    paths = tmp_path / "flat.jsonl", tmp_path / "pairs.jsonl"
    for path, rows in zip(paths, (flat, pairs)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def test_oasst_split_deduplicates_both_files_and_holds_out_whole_prompts(oasst_files):
    train, held, keys = reward_quality.oasst_split(0, paths=oasst_files)
    assert (len(train), len(held), keys) == (6, 0, set())  # 3 + 1 + 2: A's repeated pair counted once
    assert sorted((p.chosen.strip(), p.rejected) for p in train) == [
        ("A reply 0", "A reply 1"), ("A reply 0", "A reply 2"), ("A reply 1", "A reply 2"),
        ("B reply 0", "B reply 1"), ("C reply 0", "C reply 1"), ("C reply 0", "C reply 2")]
    sizes = {"user:prompt a?": 3, "user:prompt b?": 1, "user:prompt c?": 2}
    for want in range(1, 7):
        train, held, keys = reward_quality.oasst_split(want, paths=oasst_files)
        assert len(train) + len(held) == 6 and keys <= set(sizes)
        assert {group_key(p) for p in held} == keys and not keys & {group_key(p) for p in train}
        assert len(held) == sum(sizes[k] for k in keys) >= want  # whole prompts, until at least `want` pairs
        # ...and no more prompts than needed: without the last one held out, fewer than `want` pairs would be
        assert any(len(held) - sizes[k] < want for k in keys)


def test_held_out_keys_is_the_seeded_prefix_of_prompts():
    pairs = [type("P", (), {"prompt": [{"role": "user", "content": c}]})() for c in "aabbbc"]
    for seed in range(4):
        held = reward_quality.held_out_keys(pairs, 3, seed)
        assert held == reward_quality.held_out_keys(pairs, 3, seed)  # reproducible
        assert sum(group_key(p) in held for p in pairs) >= 3
    assert reward_quality.held_out_keys(pairs, 6, 0) == {"user:a", "user:b", "user:c"}


def test_both_test_sets_scored_per_pair():
    assert reward_recipes.right([2.0, 0.0, -1.0]) == [1.0, 0.5, 0.0]  # a tie counts half
    row = reward_recipes.scored("x", [1.0, -1.0], [3.0, 1.0, 0.0, -2.0], [1.0, -1.0], [], 60.0)
    assert row["accuracy"] == 0.5 and row["cross_domain_accuracy"] == pytest.approx(2.5 / 4)
    lo, hi = row["cross_domain_accuracy_ci95"]
    assert 0.0 <= lo <= 0.625 <= hi <= 1.0
    assert [reward_recipes.cross_domain(d) for d in ("hh", "oasst")] == ["oasst", "hh"]


def test_a_rows_run_merges_into_the_rows_of_the_same_settings_only(tmp_path):
    path, settings = tmp_path / "r.json", {"model": "m", "train_pairs": 2000}
    assert reward_recipes.merged(path, settings, [{"row": "a"}]) == [{"row": "a"}]  # no file yet
    path.write_text(json.dumps({"settings": {**settings, "rows": "a,b", "budget_minutes": 13},
                                "rows": [{"row": "a", "v": 1}, {"row": "b", "v": 1}]}))
    assert reward_recipes.merged(path, settings, [{"row": "a", "v": 2}, {"row": "c"}]) == \
        [{"row": "b", "v": 1}, {"row": "a", "v": 2}, {"row": "c"}]  # a redone, b kept, c added
    assert reward_recipes.merged(path, {**settings, "train_pairs": 300}, [{"row": "c"}]) == [{"row": "c"}]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_script_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reward_recipes, "OUT", tmp_path / "out")
    monkeypatch.setattr(reward_recipes, "ROOT", tmp_path)  # results/ lands under tmp_path/benchmarks
    monkeypatch.setattr(sys, "argv", ["reward_recipes.py", "--model", "tiny-random-llama", "--layer", "1",
                                      "--train-domain", "oasst", "--train-pairs", "20", "--eval-pairs", "12",
                                      "--max-length", "32", "--rows", "frozen,probe"])
    reward_recipes.main()
    result = json.loads((tmp_path / "benchmarks" / "results" / "reward_recipes_oasst.json").read_text())
    assert (result["train_domain"], result["cross_domain"]) == ("oasst", "hh")
    assert result["test_pairs"] >= 12 and result["cross_domain_test_pairs"] >= 12
    assert [r["row"] for r in result["rows"]] == ["frozen", "probe"]
    for r in result["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["cross_domain_accuracy"] <= 1
    assert "oasst acc" in capsys.readouterr().out.splitlines()[-3]  # the table's header names both domains
