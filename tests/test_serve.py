"""`chatrlhf serve` as a user meets it: a real server process on a tiny random model (its weights made
"opinionated" so that replies vary token to token), called with the official `openai` client (and raw HTTP where the
wire format itself is the point). One server for the module; tight limits so that 429, 503 and 413 are reachable."""

import contextlib
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from chatrlhf.config import ModelArgs
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.models import load_model
from conftest import free_port

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
MSG = [{"role": "user", "content": "Where is my order? It was due on Monday."}]
NAME = "tiny"


def opinionated_model_dir(path, seed=3):
    """tiny-random-llama with large random weights (as tests/test_engine.py), saved as a model folder."""
    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval(), tok


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model, tok = opinionated_model_dir(tmp / "model")
    (tmp / "keys").write_text(f"# two clients\n{KEY_A}\n{KEY_B}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "serve", "--model", str(tmp / "model"),
                             "--model-name", NAME, "--port", str(port), "--dtype", "float32", "--api-keys",
                             str(tmp / "keys"), "--max-batch", "2", "--max-queue", "2", "--max-concurrent", "2",
                             "--max-body-bytes", "20000", "--max-prompt-tokens", "200", "--max-tokens-limit", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start in 30 s")
    yield url, Engine(model, tok, "float32")
    proc.terminate()
    proc.wait(10)


def client(url, key=KEY_A, retries=0):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=60)


def metrics(url) -> dict[str, float]:
    lines = httpx.get(url + "/metrics").text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def test_models_health_and_a_reply(served):
    url, _ = served
    assert httpx.get(url + "/health").json() == {"status": "ok"}   # no key needed
    c = client(url)
    assert [m.id for m in c.models.list()] == [NAME]
    r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # this server has no --feedback-db: nothing is stored, and feedback names the flag
    fb = httpx.post(url + "/v1/feedback", json={"completion_id": r.id, "thumbs": "up"},
                    headers={"Authorization": f"Bearer {KEY_A}"})
    assert fb.status_code == 400 and "--feedback-db" in fb.json()["error"]["message"]


def test_seeded_streaming_joins_to_the_seeded_reply(served):
    url, _ = served
    c = client(url)
    ask = dict(model=NAME, messages=MSG, max_tokens=24, temperature=1.0, seed=5)
    a, b = (c.chat.completions.create(**ask) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content            # same seed, same reply
    other = c.chat.completions.create(**{**ask, "seed": 6}).choices[0].message.content
    assert other != a.choices[0].message.content
    chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert {ch.id for ch in chunks} == {chunks[0].id} and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == a.choices[0].message.content and len([ch for ch in chunks if ch.choices]) > 3   # token by token
    assert chunks[-2].choices[0].finish_reason == a.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == a.usage.completion_tokens
    with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "stream": True},
                      headers={"Authorization": f"Bearer {KEY_A}"}) as raw:
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert '"usage"' not in "".join(events)   # usage only when asked


def test_greedy_requests_stay_greedy_beside_a_sampled_one(served):
    """Every request's own temperature in one continuous batch: greedy replies equal the engine's greedy output
    while a hot sampled reply runs in the same batch (transformers serve would give them the first one's)."""
    url, engine = served
    started, finished_at = threading.Event(), []

    def hot():
        for ch in client(url).chat.completions.create(model=NAME, messages=MSG, max_tokens=400, temperature=1.5,
                                                      stream=True, extra_body={"ignore_eos": True}):
            started.set()
        finished_at.append(time.perf_counter())

    t = threading.Thread(target=hot)
    t.start()
    assert started.wait(30)
    prompts = [MSG, [{"role": "user", "content": "Reset my password please"}]]
    want = [c.text for c in engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0,
                                                                     repetition_penalty=1.2))]
    got = [client(url).chat.completions.create(model=NAME, messages=p, max_tokens=16, temperature=0)
           .choices[0].message.content for p in prompts]
    greedy_done = time.perf_counter()
    t.join(60)
    assert got == want and len(set(want)) == 2
    assert finished_at and finished_at[0] > greedy_done   # the sampled reply was still running alongside


def test_n_stop_strings_and_logprobs(served):
    url, _ = served
    c = client(url)
    r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=16, temperature=1.0, seed=2, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len({ch.message.content for ch in r.choices}) > 1
    chunks = list(c.chat.completions.create(model=NAME, messages=MSG, max_tokens=16, temperature=1.0, seed=2, n=3,
                                            stream=True))
    for ch in r.choices:   # the streamed choices interleave; each joins to its non-streamed reply
        assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices[0].index == ch.index) == \
            ch.message.content
    greedy = dict(model=NAME, messages=MSG, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**greedy).choices[0].message.content
    stop = full[5:9]
    want = full[:full.find(stop)]
    for form in (stop, [stop, "never-in-a-reply"]):
        r = c.chat.completions.create(**greedy, stop=form)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
        chunks = list(c.chat.completions.create(**greedy, stop=form, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.chat.completions.create(**greedy, logprobs=True)
    lp = r.choices[0].logprobs.content
    assert "".join(t.token for t in lp) == r.choices[0].message.content and all(t.logprob <= 0 for t in lp)
    assert len(lp) == 24 and c.chat.completions.create(**greedy).choices[0].logprobs is None


def test_errors_are_openai_shaped(served):
    url, _ = served
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, key="wrong").chat.completions.create(model=NAME, messages=MSG)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    raw = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "messages": MSG})
    assert raw.status_code == 401 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    c = client(url)
    for kw, param, code in (({"temperature": 3}, "temperature", "invalid_value"),
                            ({"extra_body": {"bogus": 1}}, "bogus", "unknown_parameter"),
                            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
                             "unsupported_parameter"),
                            ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages",
                             "context_length_exceeded")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**{"model": NAME, "messages": MSG, **kw})
        assert (e.value.status_code, e.value.param, e.value.code) == (400, param, code), kw
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=MSG)
    assert e.value.code == "model_not_found"
    big = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}"},
                     json={"model": NAME, "messages": [{"role": "user", "content": "x" * 30000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    broken = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY_A}",
                                                              "Content-Type": "application/json"}, content=b"{nope")
    assert broken.status_code == 400 and "error" in broken.json()
    assert httpx.get(url + "/nope").json()["error"]["code"] == "not_found"
    off = httpx.post(url + "/admin/reload", json={"model": "x"}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert off.status_code == 403 and "hot swap is disabled: start with --admin-key" in off.json()["error"]["message"]


def test_limits_429_503_and_a_disconnect_cancels(served):
    url, _ = served
    before = metrics(url)
    long = {"model": NAME, "messages": MSG, "max_tokens": 900, "stream": True, "ignore_eos": True}
    readers = []   # kept: leaving a `for` over iter_lines() would close its connection (a disconnect)
    with httpx.Client(timeout=30) as http, contextlib.ExitStack() as held:
        for _ in range(2):   # KEY_B's two requests in flight (--max-concurrent 2), 2 of the 4 rows
            s = held.enter_context(http.stream("POST", url + "/v1/chat/completions", json=long,
                                               headers={"Authorization": f"Bearer {KEY_B}"}))
            assert s.status_code == 200, s.read()
            readers.append(s.iter_lines())
            while '"content": ""' in (line := next(readers[-1])) or '"content": "' not in line:
                pass   # past the role chunk to the first token: it is running
        with pytest.raises(openai.RateLimitError) as e:
            client(url, KEY_B).chat.completions.create(model=NAME, messages=MSG, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.InternalServerError) as e:   # 2 rows held + 3 > 4 (--max-batch 2 + --max-queue 2)
            client(url, KEY_A).chat.completions.create(model=NAME, messages=MSG, max_tokens=2, n=3)
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    with pytest.raises(httpx.ReadTimeout):   # a non-streaming client that gives up
        httpx.post(url + "/v1/chat/completions", json={**long, "stream": False}, timeout=0.3,
                   headers={"Authorization": f"Bearer {KEY_A}"})
    cancelled = 'chatrlhf_request_success_total{finished_reason="cancelled"}'
    for _ in range(100):   # the streams closed: all three generations are cancelled and leave the batch
        m = metrics(url)
        if m.get(cancelled, 0) - before.get(cancelled, 0) == 3 and m["chatrlhf_requests_running"] == 0:
            break
        time.sleep(0.1)
    assert m[cancelled] - before.get(cancelled, 0) == 3
    assert m["chatrlhf_requests_running"] == 0 and m["chatrlhf_requests_waiting"] == 0
    assert m['chatrlhf_http_requests_total{route="/v1/chat/completions",status="429"}'] >= 1
    assert m['chatrlhf_http_requests_total{route="/v1/chat/completions",status="503"}'] >= 1
    assert m["chatrlhf_generation_tokens_total"] - before["chatrlhf_generation_tokens_total"] < 3 * 900


def test_metrics_count_requests_and_tokens(served):
    url, _ = served
    before = metrics(url)
    r = client(url).chat.completions.create(model=NAME, messages=MSG, max_tokens=5, extra_body={"ignore_eos": True})
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model=NAME, messages=MSG)
    after = metrics(url)
    ok = 'chatrlhf_http_requests_total{route="/v1/chat/completions",status="200"}'
    denied = 'chatrlhf_http_requests_total{route="/v1/chat/completions",status="401"}'
    assert after[ok] - before.get(ok, 0) == 1 and after[denied] - before.get(denied, 0) == 1
    assert after["chatrlhf_generation_tokens_total"] - before["chatrlhf_generation_tokens_total"] == 5
    assert after["chatrlhf_prompt_tokens_total"] - before["chatrlhf_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after["chatrlhf_time_to_first_token_seconds_count"] - before["chatrlhf_time_to_first_token_seconds_count"] == 1
    assert after["chatrlhf_e2e_request_latency_seconds_count"] - before["chatrlhf_e2e_request_latency_seconds_count"] == 1
    length = 'chatrlhf_request_success_total{finished_reason="length"}'
    assert after[length] - before.get(length, 0) == 1
