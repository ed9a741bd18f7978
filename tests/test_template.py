import pytest

from chatrlhf.data.template import FALLBACK_TEMPLATE, IGNORE, PLAIN_TEMPLATE, tokenize_conversation
from chatrlhf.models import load_tokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships today."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."}]


def labelled_text(tok, item):
    """Decode the runs of labelled tokens."""
    runs, cur = [], []
    for t, lab in zip(item.input_ids, item.labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur)); cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_loss_only_on_assistant_replies(name):
    tok = load_tokenizer(name)
    item, problem = tokenize_conversation(tok, CONV, max_length=1000)
    assert problem == ""
    runs = labelled_text(tok, item)
    assert len(runs) == 2
    assert runs[0].strip().startswith("It ships today.") and runs[1].strip().startswith("You're welcome.")
    # the end-of-turn token is learned (so the model learns to stop); prompt text never is
    assert tok.eos_token in runs[0] and tok.eos_token in runs[1]
    assert not any("Where is my order" in r or "Thanks!" in r or "Be brief" in r for r in runs)
    assert all(lab in (IGNORE, tid) for tid, lab in zip(item.input_ids, item.labels))


def test_gpt2_gets_fallback_template_and_llama_keeps_its_own():
    assert load_tokenizer("tiny-random-gpt2").chat_template == FALLBACK_TEMPLATE
    assert "<|im_start|>" in load_tokenizer("tiny-random-llama").chat_template
    assert load_tokenizer("tiny-random-llama", chat_template=False).chat_template == PLAIN_TEMPLATE
    assert load_tokenizer("tiny-random-gpt2", chat_template=False).chat_template == PLAIN_TEMPLATE


def test_overlong_truncate_and_drop():
    tok = load_tokenizer("tiny-random-llama")
    full, _ = tokenize_conversation(tok, CONV, max_length=1000)
    n = len(full.input_ids)
    cut, problem = tokenize_conversation(tok, CONV, max_length=n - 3)
    assert len(cut.input_ids) == n - 3 and cut.truncated and "truncated" in problem
    assert cut.input_ids == full.input_ids[: n - 3]
    none, problem = tokenize_conversation(tok, CONV, max_length=n - 3, overlong="drop")
    assert none is None and "dropped" in problem
    # cut before the first reply: nothing left to learn, so it is dropped even in truncate mode
    none, problem = tokenize_conversation(tok, CONV, max_length=5)
    assert none is None and "no reply tokens" in problem


def test_last_only_learns_just_the_final_reply():
    tok = load_tokenizer("tiny-random-llama")
    item, _ = tokenize_conversation(tok, CONV, max_length=1000, last_only=True)
    runs = labelled_text(tok, item)
    assert len(runs) == 1 and runs[0].strip().startswith("You're welcome.")


def test_seed_csv_rows_learn_only_the_response(write):
    from chatrlhf.data import load_records

    p = write("d.csv", 'history,responses\n"User: a\nAssistant: earlier reply\nUser: b",the reply\n')
    conv = load_records(p).records[0]
    assert conv.last_only
    item, _ = tokenize_conversation(load_tokenizer("tiny-random-gpt2"), conv.messages, 1000, last_only=conv.last_only)
    assert [r.strip() for r in labelled_text(load_tokenizer("tiny-random-gpt2"), item)] == ["the reply<|endoftext|>"]
