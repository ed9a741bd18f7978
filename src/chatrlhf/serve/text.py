"""Text as it streams: what part of a growing reply may be sent now.

The engine cuts a reply before the first stop string, but only once the whole stop string has been decoded; a
stream must therefore hold back the last ``max(len(stop)) − 1`` characters (they may be the start of a stop string
whose end comes with a later token) and any trailing U+FFFD (half of a multi-byte character whose other bytes come
with the next token). Pure functions; the server calls them on the event loop.
"""

from __future__ import annotations


def holdback(stops: list[str]) -> int:
    """Characters at the end of the decoded text that may still turn out to start a stop string."""
    return max((len(s) for s in stops), default=1) - 1


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found) — the engine's rule, for the tests."""
    cut = min((j for j in (text.find(s) for s in stops) if j >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamText:
    """The deltas of one streamed reply: :meth:`feed` the decoded text so far after each token, :meth:`finish` the
    engine's final text; the deltas joined are the final text."""

    def __init__(self, stops: list[str]):
        self.keep = holdback(stops)
        self.sent = ""

    def feed(self, text: str) -> str:
        """The new text that is safe to send now ('' when none)."""
        end = len(text) - self.keep
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):end], text[:end]
        return delta

    def finish(self, final: str) -> str:
        """What is left to send of the final text (cut at a stop string by the engine)."""
        if not final.startswith(self.sent):  # cannot happen with a prefix-stable decoder; say so rather than garble
            raise ValueError(f"streamed text {self.sent[-20:]!r} is not a prefix of the final reply")
        delta, self.sent = final[len(self.sent):], final
        return delta


def token_logprobs(tok, token_ids: list[int], logprobs: list[float], text: str) -> list[dict]:
    """OpenAI's ``logprobs.content`` of a finished reply: one entry per token of ``text``, its ``token`` the text it
    adds (so the tokens join to the reply; a token holding the first bytes of a multi-byte character adds '' and
    the next one the character), special tokens such as EOS and tokens after a stop-string cut left out."""
    special, content, sent, last = set(tok.all_special_ids), [], 0, len(token_ids) - 1
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        if sent >= len(text):
            break
        if t in special:
            continue
        upto = tok.decode(token_ids[:i + 1], skip_special_tokens=True)
        end = min(max(len(upto if i == last else upto.rstrip("\ufffd")), sent), len(text))
        piece, sent = text[sent:end], end
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")), "top_logprobs": []})
    if content and sent < len(text):   # a character completed only by a special token's decode: the last one's
        content[-1]["token"] += text[sent:]
        content[-1]["bytes"] = list(content[-1]["token"].encode("utf-8"))
    return content
