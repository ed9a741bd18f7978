"""Chat templates and tokenisation with assistant-only labels.

The tokenizer's own chat template is used when it has one. Models without one (GPT-2, say) get
FALLBACK_TEMPLATE, which is written into the tokenizer so that saved models keep it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

IGNORE = -100

# "User: …\nAssistant: …<eos>\n". The generation prompt ends at "Assistant:" so that the reply's
# leading space belongs to the reply tokens (BPE merges " Hello" into one token).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# --no-chat-template: plain text for continuation tasks. The turns' text joined by newlines, a reply
# continuing the text before it directly and ending with EOS; the generation prompt adds nothing. Rendered
# prefix by prefix like any template, so SFT labels, rollouts, evaluation and generation share one meaning.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if not loop.first and m['role'] != 'assistant' %}{{ '\n' }}{% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def ensure_chat_template(tokenizer, chat_template: bool = True) -> None:
    """Give the tokenizer a chat template if it has none; ``chat_template=False`` sets the plain-text one."""
    if not chat_template:
        tokenizer.chat_template = PLAIN_TEMPLATE
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def is_plain(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) == PLAIN_TEMPLATE


def prompt_format(tokenizer) -> dict:
    """How prompts are formatted, as recorded in a trained model's chatrlhf.json and checked by the evaluator."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"template": "plain" if template == PLAIN_TEMPLATE else "chat",
            "sha256": hashlib.sha256(template.encode("utf-8")).hexdigest()}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], last_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with its
    end-of-turn tokens), found by rendering prefixes of the conversation."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != len(messages) - 1):
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1]))
        if not text.startswith(render(tokenizer, messages[: i + 1])):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "use --no-chat-template (plain text)")
        spans.append((start, end))
    return text, spans


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int, overlong: str = "truncate",
                          last_only: bool = False):
    """Token ids and labels (loss on assistant tokens only, or on the final reply only with
    ``last_only``). Returns (Tokenized | None, problem)."""
    text, spans = assistant_spans(tokenizer, messages, last_only)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for k, (a, b) in enumerate(offsets):
        if any(a < end and b > start for start, end in spans):  # the token overlaps a reply
            labels[k] = ids[k]
    problem = ""
    truncated = len(ids) > max_length
    if truncated:
        if overlong == "drop":
            return None, f"{len(ids)} tokens > --max-length {max_length}: dropped"
        ids, labels = ids[:max_length], labels[:max_length]
        problem = f"{len(enc['input_ids'])} tokens > --max-length {max_length}: truncated"
    if not any(x != IGNORE for x in labels):
        return None, (problem or "no assistant tokens") + "; no reply tokens left: dropped"
    return Tokenized(ids, labels, truncated), problem
