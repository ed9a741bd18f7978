"""The pure pieces of `chatrlhf serve`: streaming text held back at a stop string (one split across tokens), the
OpenAI error shape, request validation, the admission gate, API keys, and the decoding defaults of a silent
request."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from chatrlhf.config import ServeConfig
from chatrlhf.errors import UsageError
from chatrlhf.serve import completions
from chatrlhf.serve.completions import sampling
from chatrlhf.serve.limits import ANONYMOUS, Gate, caller, digest, load_keys
from chatrlhf.serve import served as served_module
from chatrlhf.serve.protocol import APIError, ChatRequest, validation_error
from chatrlhf.serve.served import Served, retire
from chatrlhf.serve.text import StreamText, cut_at_stop, holdback
from conftest import run_cli

MSG = [{"role": "user", "content": "hi"}]


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str]:
    """The deltas a stream sends when the decoded text grows by ``pieces`` (one per token), and the final text the
    engine would give (cut before the first stop string, as soon as it is complete)."""
    s, deltas, text = StreamText(stops), [], ""
    for p in pieces:
        text += p
        final, hit = cut_at_stop(text, stops)
        if hit:
            deltas.append(s.finish(final))
            return deltas, final
        deltas.append(s.feed(text))
    deltas.append(s.finish(text))
    return deltas, text


def test_a_stop_string_split_across_tokens_is_never_sent():
    deltas, final = stream(["Hel", "lo ", "wor", "ld ST", "OP and more"], ["STOP"])
    assert final == "Hello world "
    assert "".join(deltas) == final and not any("S" in d for d in deltas)
    assert deltas == ["", "Hel", "lo ", "world", " "]   # the last 3 characters held back (len("STOP") − 1)


def test_a_held_back_prefix_that_is_no_stop_is_sent_later_and_nothing_is_lost():
    deltas, final = stream(["ab", "S", "Tx", "yz"], ["STOP", "Q"])
    assert final == "abSTxyz" and "".join(deltas) == final


def test_without_stops_every_token_goes_out_at_once_except_half_a_character():
    s = StreamText([])
    assert holdback([]) == 0 and s.feed("Hi") == "Hi" and s.feed("Hi \ufffd") == " " and s.feed("Hi é") == "é"
    assert s.finish("Hi é!") == "!"


def test_cut_at_stop_takes_the_first_stop_string():
    assert cut_at_stop("a, b. c", [".", ","]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_error_body_is_openai_shaped_with_retry_after():
    e = APIError(429, "slow down", None, "rate_limit_exceeded", 1)
    assert e.body() == {"error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                                  "code": "rate_limit_exceeded"}}
    assert e.headers() == {"Retry-After": "1"}
    assert APIError(503, "full").body()["error"]["type"] == "server_error" and APIError(400, "x").headers() == {}


@pytest.mark.parametrize("body, param, code", [
    ({"model": "m", "messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "m", "messages": MSG, "bogus": 1}, "bogus", "unknown_parameter"),
    ({"model": "m", "messages": []}, "messages", "invalid_value"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({"model": "m", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
])
def test_bad_fields_become_a_400_naming_the_field(body, param, code):
    with pytest.raises(ValidationError) as info:
        ChatRequest.model_validate(body)
    e = validation_error(info.value.errors())
    assert (e.status, e.param, e.code) == (400, param, code)


@pytest.mark.parametrize("extra, param", [({"tools": [{"type": "function"}]}, "tools"),
                                          ({"frequency_penalty": 0.5}, "frequency_penalty"),
                                          ({"response_format": {"type": "json_object"}}, "response_format"),
                                          ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
                                          ({"top_logprobs": 0}, "top_logprobs"),
                                          ({"stream_options": {"include_usage": True}}, "stream_options")])
def test_known_fields_that_are_not_built_are_refused_not_ignored(extra, param):
    with pytest.raises(APIError) as info:
        ChatRequest.model_validate({"model": "m", "messages": MSG, **extra}).check()
    assert info.value.status == 400 and info.value.param == param
    ChatRequest.model_validate({"model": "m", "messages": MSG, "frequency_penalty": 0, "tools": []}).check()


def test_the_gate_refuses_per_key_with_429_and_when_full_with_503():
    gate = Gate(rows=4, per_key=2)
    gate.enter("a", 1)
    gate.enter("a", 1)
    with pytest.raises(APIError) as info:
        gate.enter("a", 1)
    assert info.value.status == 429 and info.value.retry_after == 1
    with pytest.raises(APIError) as info:
        gate.enter("b", 3)
    assert info.value.status == 503 and info.value.retry_after == 1
    gate.enter("b", 2)
    gate.leave("a", 1)
    gate.leave("a", 1)
    gate.leave("b", 2)
    assert gate.rows == 0 and gate.by_key == {}


def test_api_keys_from_a_flag_and_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\n\nkey-of-alice-0123456789\n")
    digests = load_keys("flag-key", str(keys))
    assert digests == [digest("flag-key"), digest("key-of-alice-0123456789")]
    assert caller("Bearer key-of-alice-0123456789", digests) == digest("key-of-alice-0123456789")[:12]
    for header in (None, "Bearer wrong", "Basic key-of-alice-0123456789", "Bearer "):
        with pytest.raises(APIError) as info:
            caller(header, digests)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert caller(None, []) == ANONYMOUS
    keys.write_text("short\n")
    with pytest.raises(UsageError, match=r"keys:1: an API key must be at least 16"):
        load_keys("", str(keys))


def test_a_silent_request_gets_the_chat_defaults_and_its_own_settings_win():
    cfg = ServeConfig(model="m")
    p = sampling(ChatRequest.model_validate({"model": "m", "messages": MSG}), cfg)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens, p.n) == (0.7, 100, 1.0, 1.2, 128, 1)
    p = sampling(ChatRequest.model_validate({"model": "m", "messages": MSG, "temperature": 0, "top_p": 0.5,
                                             "max_completion_tokens": 7, "stop": "x", "n": 2}), cfg)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens, p.stop, p.n) == (0, 0, 1.0, 7, ["x"], 2)  # greedy: no filters
    for body, param in (({"n": 9}, "n"), ({"max_tokens": 2000}, "max_tokens")):
        with pytest.raises(APIError) as info:
            sampling(ChatRequest.model_validate({"model": "m", "messages": MSG, **body}), cfg)
        assert info.value.param == param


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch 0: must be at least 1"),
    (["--max-queue", "-1"], "--max-queue -1: must be 0 or more"),
    (["--top-p", "0"], "a decoding flag is out of range: SamplingParams.top_p = 0.0"),
    (["--api-keys", "no-such-file"], "--api-keys no-such-file: file not found"),
    (["--candidates", "3"], "--candidates 3 without --rerank does nothing"),
    (["--rerank", "rm:no-such-dir", "--candidates", "9", "--max-batch", "4", "--max-queue", "4"],
     "--candidates 9: over --max-batch + --max-queue (8)"),
    (["--rerank", "rm:no-such-dir"], "--rerank rm:no-such-dir: folder no-such-dir not found"),
    (["--admin-key", "too-short"], "--admin-key: must be at least 16 characters"),
    (["--admin-key", "k" * 16, "--api-key", "k" * 16], "--admin-key: is also an API key"),
])
def test_bad_serve_flags_are_named_before_the_model_loads(argv, message):
    r = run_cli("serve", "--model", "no-such-model", *argv)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


class StalledThenFailingJob:
    """A job whose first wait outlasts the ping interval and whose engine then fails."""

    def __init__(self):
        self.requests = [SimpleNamespace(params=SimpleNamespace(stop=[]), finished=False, token_ids=[], text="")]
        self.served = SimpleNamespace(tok=None)
        self.waits, self.closed = 0, 0

    async def changed(self):
        self.waits += 1
        if self.waits == 1:
            await asyncio.sleep(5)

    def failed(self):
        return APIError(500, 'the "engine" failed', None, "engine_error") if self.waits >= 2 else None

    def usage(self):
        raise AssertionError("no usage chunk after a failure")

    def close(self):
        self.closed += 1


def test_a_stream_pings_while_it_waits_and_ends_a_failure_with_an_error_event(monkeypatch):
    monkeypatch.setattr(completions, "PING_SECONDS", 0.01)
    job = StalledThenFailingJob()

    async def events():
        return [e async for e in completions.stream(job, {"id": "chatcmpl-x"}, include_usage=True, body=None)]

    got = asyncio.run(events())
    assert got[0].startswith("data: ") and '"role": "assistant"' in got[0]
    assert got[1] == ": ping\n\n" and got[-1] == "data: [DONE]\n\n" and len(got) == 4
    assert json.loads(got[2].removeprefix("data: "))["error"]["message"] == 'the "engine" failed'   # valid JSON
    assert job.closed == 1


def test_a_swapped_out_model_stops_only_after_its_last_request(monkeypatch):
    monkeypatch.setattr(served_module, "RETIRE_POLL_SECONDS", 0.001)
    stopped = []
    engine = SimpleNamespace(device=SimpleNamespace(type="cpu"), stop=lambda: stopped.append(1))
    old = Served(engine, "a", "dir-a", "sha256:a", jobs=2)   # two requests still running on it

    async def swap_out():
        task = asyncio.ensure_future(retire(old))
        for _ in range(2):
            await asyncio.sleep(0.02)
            assert not stopped and old.engine is engine
            old.jobs -= 1   # one request closes
        await asyncio.wait_for(task, 5)

    asyncio.run(swap_out())
    assert stopped == [1] and old.engine is None   # stopped once, and let go
