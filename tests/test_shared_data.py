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
