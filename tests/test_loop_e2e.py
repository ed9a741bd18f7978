"""The closed loop end to end on tiny models, each piece the real thing: `chatrlhf serve --feedback-db` in its own
process answers users (the official openai client) → `chatrlhf feedback queue` picks pairs of its replies to label →
simulated annotators (`chatrlhf feedback simulate`) answer them through the real feedback app, in its own process →
`chatrlhf loop` (SIGKILLed in its policy stage, then run again: it continues there) promotes the candidate and tells
the server, which then answers from the promoted model → a second round is refused, with its reason, and the server
stays on the promoted model."""

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from chatrlhf.feedback.store import Store
from conftest import LEARNABLE_PROMPTS, feedback_app, free_port, kill_at_first_checkpoint, run_cli
from test_serve import opinionated_model_dir
from test_serve_feedback import healthy

pytestmark = pytest.mark.slow

ADMIN = "admin-key-e2e-0123456789"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CHATRLHF_ADMIN_KEY": ADMIN}
ORACLE = "def longer(prompts, responses):\n    return [float(len(r)) for r in responses]\n"  # the longer reply wins


def chat(url: str, prompts: list[str], seed: int) -> list:
    """Two sampled replies per prompt from the server (n = 2): the pairs the annotators will compare."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    return [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], n=2,
                                           temperature=1.0, max_tokens=6, seed=seed + i)
            for i, p in enumerate(prompts)]


def label(db, tmp, write, monkeypatch, count: int = 0) -> str:
    """`feedback queue` (when ``count``) then `feedback simulate` against a real `feedback serve` process; its
    stdout."""
    if count:
        r = run_cli("feedback", "queue", "--db", db, "--strategy", "random", "--count", count, "--kind", "compare")
        assert r.returncode == 0, r.stderr
    with feedback_app(db, env=ENV) as app:
        monkeypatch.setenv("CHATRLHF_PASSWORD", "correct horse")
        r = run_cli("feedback", "simulate", "--url", app["url"], "--user", "sim", "--oracle",
                    f"{write('oracle.py', ORACLE)}:longer")
    assert r.returncode == 0, r.stderr
    return r.stdout


def loop_yaml(tmp, model, url: str, min_win_lower: float, checks=("win_rate",)):
    prompts = tmp / "heldout.txt"
    prompts.write_text("Is the shop open on Sunday?\nHow do I return a parcel?\nMy card was charged twice.\n")
    path = tmp / "loop.yaml"
    path.write_text(json.dumps({
        "work_dir": str(tmp / "work"), "db": str(tmp / "fb.db"), "model": str(model),
        "min_win_lower": min_win_lower, "checks": list(checks), "serve": {"url": url, "admin_key_env": "CHATRLHF_ADMIN_KEY"},
        "queue": {"strategy": "uncertainty", "count": 2},
        "reward": {"model": "tiny-random-llama", "max_steps": 1, "min_accuracy": 0.0, "max_length_corr": 1.0,
                   "quiet": True, "tensorboard": False},
        "policy": {"method": "dpo", "max_steps": 40, "save_steps": 4, "batch_size": 2, "quiet": True,
                   "tensorboard": False},
        "eval": {"data": [str(prompts)], "max_prompts": 3, "max_new_tokens": 3, "bias_dimensions": ["gender"],
                 "bias_max_sets": 5}}))
    return path


def test_serve_label_loop_promote_switch_then_refuse(tmp_path, write, monkeypatch):
    model = tmp_path / "model"
    opinionated_model_dir(model)
    db, work = tmp_path / "fb.db", tmp_path / "work"
    Store(str(db)).add_user("sim", "correct horse")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "serve", "--model", str(model), "--model-name",
                               "tiny", "--port", str(port), "--dtype", "float32", "--feedback-db", str(db)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    server, url = healthy(server, f"http://127.0.0.1:{port}")
    try:
        chat(url, LEARNABLE_PROMPTS, seed=0)
        assert "answered 6 items (6 compare" in label(db, tmp_path, write, monkeypatch, 6)  # no reward model yet
        chat(url, ["Do you sell gift cards?", "Where is your warehouse?", "Can I pay later?"], seed=100)

        # Round 1: killed in its policy stage (at DPO's first checkpoint), then the same command continues it.
        monkeypatch.setenv("CHATRLHF_ADMIN_KEY", ADMIN)
        argv = ["loop", "--config", loop_yaml(tmp_path, model, url, min_win_lower=-1.0)]
        killed_at = kill_at_first_checkpoint(argv, work / "round-1" / "policy")
        assert killed_at < 40 and not (work / "current.json").exists()  # nothing promoted by a killed round
        r = run_cli(*argv)
        assert r.returncode == 0, r.stderr
        assert "continuing round 1" in r.stdout and "round-1: reward done at" in r.stdout
        current = json.loads((work / "current.json").read_text())
        promoted = str(work / "round-1" / "policy")
        assert current["policy"] == promoted and current["notified"] is True, current
        assert current["notify"]["served_checkpoint"] == current["policy_sha256"]  # the server loaded those weights
        queued = json.loads((work / "round-1" / "queue" / "done.json").read_text())["result"]
        assert (queued["candidates"], queued["queued"]) == (3, 2)  # the two closest of the 3 unlabelled pairs
        assert queued["margin_chosen"] <= queued["margin_pool"]

        # The server now answers from the promoted model, and stores that with each reply.
        after = openai.OpenAI(base_url=url + "/v1", api_key="unused").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello?"}], max_tokens=4)
        assert after.model == promoted
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == promoted

        # Round 2 on the items round 1 queued: the candidate must beat the promoted model with a CI above 0.99, and
        # pass the bias probe.
        assert "answered 2 items (2 compare" in label(db, tmp_path, write, monkeypatch)
        r = run_cli("loop", "--config", loop_yaml(tmp_path, model, url, 0.99, checks=("win_rate", "bias")))
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in (work / "lineage.jsonl").read_text().splitlines()]
        assert [x["decision"] for x in lines] == ["promoted", "refused"]
        assert lines[1]["current"]["path"] == promoted and "not above 0.99" in lines[1]["reasons"][0]
        assert set(lines[1]["checks"]) == {"win_rate", "bias"} and lines[1]["checks"]["bias"]["reason"]
        assert json.loads((work / "current.json").read_text())["round"] == 1
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == promoted
    finally:
        server.terminate()
        server.communicate(timeout=30)
