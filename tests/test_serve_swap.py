"""Hot swap on a real `chatrlhf serve` process: two tiny random models in folders (different seeds, so their greedy
replies differ), the official openai client from threads, POST /admin/reload in the middle. Every request completes
in full on the model it started on; those after the switch get the new model's greedy reply and name it, and so
does the feedback store's provenance; bad folders, wrong keys and a second reload at once are refused while the
server serves on. One server for the module (tests/test_serve_feedback.py's start())."""

import threading
import time

import httpx
import openai
import pytest
from sqlalchemy import select

from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.feedback.store import Store
from chatrlhf.feedback.tables import Reply
from chatrlhf.serve.served import checkpoint_hash
from test_serve import opinionated_model_dir
from test_serve_feedback import KEY, start

ADMIN = "admin-0123456789abcdef"
PROMPTS = [[{"role": "user", "content": "Where is my order?"}], [{"role": "user", "content": "Reset my password"}],
           [{"role": "user", "content": "Do you ship to Canada?"}]]
LONG, SHORT = 48, 12
HELD = 256   # tokens of the streams in flight across the switch: several times what a tiny model's reload takes


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swap")
    engines = {"a": Engine(*opinionated_model_dir(tmp / "model"), "float32"),
               "b": Engine(*opinionated_model_dir(tmp / "b", seed=4), "float32")}
    want = {(m, n): [c.text for c in e.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                                        repetition_penalty=1.2))]
            for m, e in engines.items() for n in (LONG, SHORT)}
    assert want["a", SHORT] != want["b", SHORT]
    proc, url = start(["--admin-key", ADMIN, "--feedback-db", str(tmp / "fb.db"), "--max-batch", "16",
                       "--max-queue", "16", "--max-concurrent", "16"], tmp)
    yield url, tmp, want
    proc.terminate()
    proc.wait(10)


def reload(url, body, key=ADMIN):
    return httpx.post(url + "/admin/reload", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def metric(url, name) -> float:
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def ask(url, i, max_tokens, stream, out, started=None):
    """Request ``i`` (prompt i % 3, greedy, exactly max_tokens long) into out[i]: (id, model, text, tokens); a
    stream sets ``started`` at its first token."""
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=PROMPTS[i % 3], max_tokens=max_tokens, temperature=0,
              extra_body={"ignore_eos": True})
    try:
        if stream:
            chunks = []
            for ch in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                chunks.append(ch)
                if started and ch.choices and ch.choices[0].delta.content:
                    started.set()
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            out[i] = (chunks[0].id, chunks[0].model, text, chunks[-1].usage.completion_tokens)
        else:
            r = c.chat.completions.create(**kw)
            out[i] = (r.id, r.model, r.choices[0].message.content, r.usage.completion_tokens)
    except Exception as e:  # noqa: BLE001 - the main thread asserts on it
        out[i] = e


def test_hot_swap_under_concurrent_requests_loses_none(swap):
    url, tmp, want = swap
    out, started = {}, [threading.Event() for _ in range(3)]
    before = [threading.Thread(target=ask, args=(url, i, HELD, True, out, started[i // 2])) if i % 2 == 0 else
              threading.Thread(target=ask, args=(url, i, LONG, False, out)) for i in range(6)]
    for t in before:
        t.start()
    assert all(e.wait(30) for e in started)   # three long streams are running on the old model
    r = reload(url, {"model": str(tmp / "b")})
    assert r.status_code == 200, r.text
    b = str(tmp / "b")
    assert r.json() == {"object": "reload", "model": b, "checkpoint": checkpoint_hash(b),
                        "previous": {"model": "tiny", "checkpoint": checkpoint_hash(str(tmp / "model"))}}
    assert metric(url, "chatrlhf_engines") == 2   # the old engine serves on for its streams
    after = [threading.Thread(target=ask, args=(url, i, SHORT, i % 2 == 0, out)) for i in range(6, 12)]
    for t in after:
        t.start()
    for t in before + after:
        t.join(60)
    assert sorted(out) == list(range(12)) and not [e for e in out.values() if isinstance(e, Exception)], out
    hashes = {"tiny": checkpoint_hash(str(tmp / "model")), b: checkpoint_hash(b)}
    paths = {"tiny": str(tmp / "model"), b: b}
    for i in (0, 2, 4):   # the long streams finished whole on the old model (a greedy reply starts as a shorter one)
        head = want["a", LONG][i % 3].rstrip("\ufffd")
        assert out[i][1] == "tiny" and out[i][3] == HELD and out[i][2].startswith(head), i
    for i in (1, 3, 5, *range(6, 12)):   # each reply whole, from the model it names ("tiny" still works after the swap)
        name, n = out[i][1], LONG if i < 6 else SHORT
        assert name in hashes and out[i][2:] == (want["a" if name == "tiny" else "b", n][i % 3], n), i
    # every request sent after the switch ran on the new model (the non-streaming ones sent before it ran on
    # whichever model was served when their request arrived)
    assert {out[i][1] for i in range(6, 12)} == {b}
    assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key=KEY).models.list()] == [b, "tiny"]
    for _ in range(100):   # the old engine stops once its last request has gone
        if metric(url, "chatrlhf_engines") == 1:
            break
        time.sleep(0.05)
    assert metric(url, "chatrlhf_engines") == 1
    store = Store(str(tmp / "fb.db"))
    for _ in range(100):   # the store writes run after the replies
        with store.reading() as s:
            rows = {r.completion_id: (r.model, r.checkpoint, r.decoding["model_path"])
                    for r in s.scalars(select(Reply))}
        if len(rows) == 12:
            break
        time.sleep(0.05)
    assert all(rows[out[i][0]] == (out[i][1], hashes[out[i][1]], paths[out[i][1]]) for i in range(12)), rows


def test_bad_reloads_are_refused_and_the_server_serves_on(swap):
    url, tmp, want = swap
    for body, says in (({"model": str(tmp / "nope")}, "not a known model name, a folder or a .gguf file"),
                       ({"model": str(tmp)}, "folder has no config.json"), ({"model": "x", "modle": "x"}, "modle")):
        r = reload(url, body)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    for key, status, code in ((KEY, 403, "not_admin"), ("wrong-0123456789abcdef", 401, "invalid_admin_key")):
        r = reload(url, {"model": str(tmp / "model")}, key=key)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code)
    assert httpx.post(url + "/admin/reload", json={"model": str(tmp / "model")}).status_code == 401
    with pytest.raises(openai.AuthenticationError):   # the admin key is no API key
        openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0).models.list()
    statuses, at_once = [], threading.Barrier(3)

    def reload_at_once(http):
        at_once.wait()   # the three arrive within milliseconds; a load takes a tenth of a second or more
        statuses.append(http.post(url + "/admin/reload", json={"model": str(tmp / "model"), "name": "tiny-a"},
                                  headers={"Authorization": f"Bearer {ADMIN}"}).status_code)

    with httpx.Client(timeout=60) as h1, httpx.Client(timeout=60) as h2, httpx.Client(timeout=60) as h3:
        threads = [threading.Thread(target=reload_at_once, args=(h,)) for h in (h1, h2, h3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert 200 in statuses and 409 in statuses and set(statuses) == {200, 409}, statuses   # one reload at a time
    out = {}
    ask(url, 0, SHORT, False, out)
    assert out[0][1:] == ("tiny-a", want["a", SHORT][0], SHORT)
