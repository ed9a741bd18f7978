"""Readers on the real human data in ../shared/data (skipped cleanly when the folder is absent)."""
import pytest

from chatrlhf.data import as_conversations, load_records, split_by_prompt
from chatrlhf.data.split import group_key
from conftest import SHARED_DATA

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")]


def test_hh_rlhf_test_split():
    loaded = load_records(SHARED_DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    assert loaded.format == "hh"
    identical = [p for p in loaded.problems if "identical" in p.message]
    assert len(identical) == 2 and len(loaded.records) == 1954 - 2   # README: 2 pairs have chosen == rejected
    for p in loaded.records[:50]:
        assert p.prompt[-1]["role"] == "user" and p.chosen != p.rejected
    train, held = split_by_prompt(loaded.records, 0.1)
    assert not {group_key(r) for r in train} & {group_key(r) for r in held}


def test_oasst_trees_and_rank_pairs():
    trees = load_records(SHARED_DATA / "sft" / "oasst_en100_trees.jsonl.gz")
    top1 = load_records(SHARED_DATA / "sft" / "oasst_en100_top1_messages.jsonl.gz")
    assert trees.format == "oasst_tree" and top1.format == "conversation"
    # our top-1 path rule reproduces the derived file of the data README
    assert [r.messages for r in trees.records] == [r.messages for r in top1.records]
    assert len(as_conversations(trees)) == 95
    pairs = load_records(SHARED_DATA / "sft" / "oasst_en100_rank_pairs.jsonl.gz")
    assert pairs.format == "oasst_pairs" and len(pairs.records) == 732


def test_self_instruct_tasks():
    tasks = load_records(SHARED_DATA / "sft" / "self_instruct_seed_tasks.jsonl.gz")
    assert tasks.format == "self_instruct" and len(tasks.records) >= 175


def test_oasst_trees_give_the_rank_pairs_of_the_derived_file():
    trees = load_records(SHARED_DATA / "sft" / "oasst_en100_trees.jsonl.gz")
    derived = load_records(SHARED_DATA / "sft" / "oasst_en100_rank_pairs.jsonl.gz")
    key = lambda p: (str(p.prompt), p.chosen, p.rejected)  # noqa: E731
    assert sorted(map(key, trees.of("preference"))) == sorted(map(key, derived.records))  # 732, same rule


def test_oasst1_flat_export():
    path = SHARED_DATA / "sft" / "oasst1_en_validation_messages.jsonl.gz"
    loaded = load_records(path)
    assert (loaded.format, loaded.kind) == ("oasst_flat", "preference")
    # README: 191 trees, 1,026 ranked-sibling pairs before filtering; 3 replies whose parent (root) is not in the
    # split are skipped, 4 pairs involve a deleted or failed-review reply, 1 pair has identical texts
    orphans = [p for p in loaded.problems if "is not in the file" in p.message]
    identical = [p for p in loaded.problems if "identical" in p.message]
    assert (len(orphans), len(identical), len(loaded.problems)) == (3, 1, 4)
    assert len(loaded.records) == 1021
    convs, prompts = as_conversations(loaded), loaded.of("prompt")
    assert len(convs) == 188 and sum(len(p.messages) == 1 for p in prompts) == 188 and len(prompts) == 751
    assert len(as_conversations(load_records(path, "oasst_flat_all"))) == 1185
    first = convs[0].messages  # the export's first tree (line 1)
    assert first[0] == {"role": "user", "content": "What do you think about ChatGPT?"}
    assert convs[0].where == f"{path}:1" and first[1]["role"] == "assistant"
    for p in loaded.records[:100]:
        assert p.prompt[-1]["role"] == "user" and p.chosen != p.rejected
