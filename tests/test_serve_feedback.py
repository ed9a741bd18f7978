"""`chatrlhf serve --feedback-db --redact` end to end: a real server process on the tiny model and a SQLite file,
the official openai client, POST /v1/feedback (thumbs, rating, correction, comparison), then the real
`chatrlhf feedback export` and `chatrlhf data inspect` on what it wrote (their CLI run in this process: a process
start costs seconds). Without --feedback-db: tests/test_serve.py."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from chatrlhf.cli import main
from chatrlhf.serve.feedback import FeedbackLog
from chatrlhf.serve.metrics import Metrics
from conftest import free_port
from test_serve import opinionated_model_dir

KEY = "key-f-0123456789abcdef"
MSG = [{"role": "user", "content": "Where is my order? Mail me at jo@shop.example.com or call +1-555-123-4567, "
                                   "order 12345678"}]
CLI = [sys.executable, "-m", "chatrlhf.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(args, tmp):
    return healthy(*spawn(args, tmp))


def spawn(args, tmp):
    """`chatrlhf serve` on tmp/model, not waited for (see healthy): (process, url)."""
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--model", str(tmp / "model"), "--model-name", "tiny", "--port", str(port),
                             "--dtype", "float32", "--api-key", KEY, "--max-new-tokens", "6", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    return proc, f"http://127.0.0.1:{port}"


def healthy(proc, url):
    """(proc, url) once /health answers 200; the test fails with the server's output if it exits first."""
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not start in 30 s")


@pytest.fixture
def model_dir(tmp_path):
    opinionated_model_dir(tmp_path / "model")
    return tmp_path


def post(url, body, key=KEY):
    return httpx.post(url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_feedback_round_trip_to_export_with_provenance_and_redaction(model_dir, capsys):
    tmp, db = model_dir, model_dir / "fb.db"
    proc, url = start(["--feedback-db", str(db), "--redact"], tmp)
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        one = c.chat.completions.create(model="tiny", messages=MSG, n=2, temperature=1.0, seed=3, max_tokens=5)
        two = c.chat.completions.create(model="tiny", messages=MSG, temperature=0.5, top_p=0.9, seed=4,
                                        stream=True)
        two_id = [chunk.id for chunk in two][0]
        answers = [post(url, {"completion_id": one.id, "thumbs": "up"}),
                   post(url, {"completion_id": one.id, "choice_index": 1, "rating": 4}),
                   post(url, {"completion_id": one.id, "correction": "Write to help@shop.example.com, order 12345678"}),
                   post(url, {"completion_id": one.id,
                              "compare": {"other_completion_id": two_id, "preferred": "other"}})]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert [a.json()["kind"] for a in answers] == ["rate", "rate", "correct", "compare"]
        again = post(url, {"completion_id": one.id, "thumbs": "down"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_feedback"
        unknown = post(url, {"completion_id": "chatcmpl-nope", "rating": 2})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
        for bad in ({"completion_id": one.id}, {"completion_id": one.id, "rating": 6},
                    {"completion_id": one.id, "thumbs": "up", "rating": 3}, {"completion_id": one.id, "x": 1}):
            r = post(url, bad)
            assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
        assert post(url, {"completion_id": one.id, "rating": 3}, key="wrong-key-0123456789").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    out = tmp / "export"
    assert main(["feedback", "export", "--db", str(db), "--output-dir", str(out)]) == 0
    rows = {n: [json.loads(line) for line in (out / f"{n}.jsonl").read_text().splitlines()]
            for n in ("ratings", "corrections", "preferences")}
    assert sorted((r["choice_index"], r["score"]) for r in rows["ratings"]) == [(0, "up"), (1, 4)]
    rating = rows["ratings"][0]
    assert rating["model"] == "tiny" and rating["checkpoint"].startswith("sha256:") and len(rating["checkpoint"]) == 71
    assert rating["decoding"]["temperature"] == 1.0 and rating["decoding"]["seed"] == 3
    assert rating["decoding"]["sent"]["max_tokens"] == 5 and rating["completion_id"] == one.id
    assert rating["prompt"] == [{"role": "user", "content": "Where is my order? Mail me at [email] or call [phone], "
                                                            "order 12345678"}]
    assert rows["corrections"][0]["corrected"] == "Write to [email], order 12345678"
    compared = [p for p in rows["preferences"] if p["source"] == "feedback"]
    assert len(compared) == 1 and compared[0]["chosen_completion_id"] == two_id
    assert compared[0]["chosen_decoding"]["top_p"] == 0.9 and compared[0]["rejected_completion_id"] == one.id
    for name, fmt in (("ratings", "rating"), ("corrections", "correction"), ("preferences", "preference")):
        capsys.readouterr()
        assert main(["data", "inspect", str(out / f"{name}.jsonl"), "--model", "tiny-random-llama"]) == 0
        report = capsys.readouterr().out
        assert f'"format": "{fmt}"' in report, report


def test_a_failed_store_write_is_counted_and_logged_not_raised(tmp_path, caplog):
    log, metrics = FeedbackLog(str(tmp_path / "f.db"), redacting=False), Metrics(lambda: [])

    async def serve_one():
        log.submit({"id": "chatcmpl-x"}, metrics)   # no messages: the write fails in its thread
        await log.pending["chatcmpl-x"]

    asyncio.run(serve_one())
    assert metrics.store_errors._value.get() == 1 and log.pending == {}
    assert "storing completion chatcmpl-x failed" in caplog.text
