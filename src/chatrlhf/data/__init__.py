"""Data: readers, record types, validation with file:line errors, chat templates, splits.
Never imports models or trainers."""

from chatrlhf.data.formats import load_prompts, load_records, parse_turns
from chatrlhf.data.records import Conversation, Correction, Loaded, Preference, Problem, Rating
from chatrlhf.data.split import split_by_prompt
from chatrlhf.errors import DataError

__all__ = ["Conversation", "Correction", "Loaded", "Preference", "Problem", "Rating", "load_prompts",
           "load_records", "parse_turns", "split_by_prompt", "as_conversations"]


def as_conversations(loaded: Loaded) -> list[Conversation]:
    """Records for SFT: conversations as they are, corrections as (prompt, corrected), preferences as
    (prompt, chosen) unless both replies are bad; OpenAssistant trees as their conversation view. A conversation
    must end on an assistant turn."""
    if loaded.kind == "prompt":
        where = loaded.records[0].where.rpartition(":")[0] if loaded.records else ""
        raise DataError(where, None, None, f"prompts only (format {loaded.format}): no replies to learn from",
                        "give conversations (messages), prompt-completion rows (prompt, completion), preferences or "
                        "corrections; prompt files are for ppo, generate and eval")
    out = []
    for r in loaded.of("conversation"):
        if isinstance(r, Conversation):
            if r.messages[-1]["role"] != "assistant":
                path, _, line = r.where.rpartition(":")
                raise DataError(path, line, "messages", "conversation ends on a user turn, nothing to learn",
                                "add the assistant's reply or drop the record")
            out.append(r)
        elif isinstance(r, Correction):
            out.append(r.as_conversation())
        elif isinstance(r, Preference) and not r.both_bad:
            out.append(Conversation(r.prompt + [{"role": "assistant", "content": r.chosen}], r.where))
        elif isinstance(r, Rating):
            raise DataError(r.where, None, None, "ratings cannot train SFT directly",
                            "use `chatrlhf reward train`, or give conversations")
    return out
