"""`chatrlhf loop`: the decision worked by hand, config errors that name the key, and one real round on tiny models
(a SQLite feedback store with answered compare items → reward model → gate → DPO → eval → promotion → the server
told over real HTTP), killed in its policy stage and continued without redoing the earlier stages."""

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from chatrlhf import loop
from chatrlhf.config import LoopConfig, build_config
from chatrlhf.errors import UsageError
from chatrlhf.feedback.imports import import_file
from chatrlhf.feedback.store import Store
from conftest import LEARNABLE_PROMPTS, LEARNABLE_REPLIES, run_cli

# --------------------------------------------------------------------------- the decision, by hand


def test_promotes_only_when_the_win_rate_ci_is_above_the_threshold():
    above = {"win_rate": {"mean": 0.7, "ci95": [0.55, 0.85]}}
    below = {"win_rate": {"mean": 0.6, "ci95": [0.45, 0.75]}}
    ok, why = loop.win_rate_check(above, 0.5)
    assert ok and "0.550" in why
    ok, why = loop.win_rate_check(below, 0.5)
    assert not ok and "0.450" in why and "not above 0.5" in why
    assert loop.win_rate_check(above, 0.6)[0] is False  # the threshold is configurable
    assert loop.win_rate_check({"win_rate": None}, 0.5) == (False, "no win rate: the evaluation had no reward model "
                                                                   "to judge the replies")
    d = loop.decide({"win_rate": loop.win_rate_check(above, 0.5)})
    assert d["promote"] and d["checks"]["win_rate"]["ok"]
    d = loop.decide({"win_rate": loop.win_rate_check(below, 0.5)})
    assert not d["promote"] and d["reasons"][0].startswith("win_rate: win rate 0.600")


def test_a_failed_check_refuses_with_its_reason():
    ev = {"win_rate": {"mean": 0.9, "ci95": [0.8, 1.0]}, "kl": {"mean": 7.5, "ci95": [6.0, 9.0]}}
    checks = {"win_rate": loop.win_rate_check(ev, 0.5), "kl": loop.kl_check(ev, 5.0)}
    d = loop.decide(checks)
    assert not d["promote"]
    assert d["reasons"] == ["kl: KL to the current policy 7.500 nats/reply above 5"]
    assert loop.decide({**checks, "kl": loop.kl_check(ev, 8.0)})["promote"]
    assert loop.decide({})["promote"] is False  # nothing checked: nothing promoted


def test_the_bias_check_blocks_a_candidate_with_a_gap_over_the_threshold():
    def report(mean, ci, sets=16):
        gap = {"pair": ["female", "male"], "mean": mean, "ci95": ci, "sets": sets}
        return {"bias": {"threshold": 0.1, "dimensions": {"name_gender": {"measures": {"rm_reply": {"max_gap": gap}}}}}}

    ok, why = loop.bias_gate(report(0.3, [0.2, 0.4]))
    assert not ok and why.startswith("name_gender/rm_reply: gap") and "+0.300" in why and "threshold 0.1" in why
    assert loop.bias_gate(report(0.05, [0.01, 0.09])) == (True, "no gap between groups over 0.1")  # under it
    assert loop.bias_gate(report(0.3, [-0.1, 0.7]))[0]  # its CI holds 0: not shown
    assert loop.bias_gate(report(0.3, [0.2, 0.4], sets=3))[0]  # too few sets to show anything
    assert loop.bias_gate({"bias": None}) == (False, "no bias report: the evaluation ran without the bias probe")
    d = loop.decide({"win_rate": (True, "fine"), "bias": loop.bias_gate(report(0.3, [0.2, 0.4]))})
    assert not d["promote"] and d["reasons"][0].startswith("bias: name_gender/rm_reply")


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize("yaml, message", [
    ("policy: {method: dpo}\nreward: {epoch: 1}\n", "loop.yaml: reward: unknown key 'epoch'"),
    ("policy: {method: dpo, output_dir: x}\n", "loop.yaml: policy.output_dir: the loop sets this itself"),
    ("policy: {method: dpo, beta: high}\n", "loop.yaml: policy.beta must be float, got 'high'"),
    ("policy: {method: sft}\n", "loop.yaml: policy.method: sft is unknown"),
    ("policy: {beta: 0.1}\n", "loop.yaml: policy.method: missing"),
    ("policy: {method: ppo, reward_model: x}\n", "loop.yaml: policy.reward_model: the loop sets this itself"),
    ("policy: {method: dpo}\nchecks: [win_rate, kl]\n", "loop.yaml: checks has kl but max_kl is 0.0"),
    ("policy: {method: dpo}\nserve: {url: localhost:8000}\n", "loop.yaml: serve: url 'localhost:8000' is not"),
])
def test_config_errors_name_the_file_and_key(tmp_path, yaml, message):
    path = tmp_path / "loop.yaml"
    path.write_text(yaml)
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_config(LoopConfig, {}, str(path))


def test_sections_from_flags_are_typed(tmp_path):
    import argparse

    from chatrlhf.config import add_dataclass_args

    parser = argparse.ArgumentParser()  # `chatrlhf loop`'s flags (test_cli.py walks the real parser)
    add_dataclass_args(parser, LoopConfig)
    ns = parser.parse_args(["--policy", "method=dpo,beta=0.2,max_steps=3,quiet=true", "--human-weight",
                            "linear:1:0.2:5"])
    with pytest.raises(UsageError, match="human_weight with policy.method dpo"):
        loop.plan_of(build_config(LoopConfig, ns))
    ns = parser.parse_args(["--policy", "method=dpo,beta=0.2,max_steps=3,quiet=true"])
    plan = loop.plan_of(build_config(LoopConfig, ns))
    assert plan.method == "dpo" and plan.policy == {"beta": 0.2, "max_steps": 3, "quiet": True}


# --------------------------------------------------------------------------- one real round, killed and continued


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.seen.append({"path": self.path, "body": json.loads(body), "auth": self.headers["Authorization"]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"object": "reload", "model": "m", "checkpoint": "sha256:served"}).encode())

    def log_message(self, *args):
        pass


def answered_store(db: Path, data: Path) -> None:
    """Compare items imported from ``data`` and answered by one annotator (always the first reply)."""
    store = Store(str(db))
    user = store.add_user("ann", "correct horse").id
    import_file(store, str(data), k=1)
    while (item := store.lease(user)) is not None:
        store.submit(user, item, choice="a")
    store.engine.dispose()


def loop_yaml(tmp: Path, policy: dict | None = None, **extra) -> Path:
    """tmp/loop.yaml for one cheap round on tiny models over a store of answered compare items (tmp/fb.db)."""
    prefs = tmp / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": f"{r} Thank you!", "rejected": f"{r} Numbers 0 1 2."})
                             + "\n" for p, r in zip(LEARNABLE_PROMPTS, LEARNABLE_REPLIES)))
    answered_store(tmp / "fb.db", prefs)
    path = tmp / "loop.yaml"
    path.write_text(json.dumps({
        "work_dir": str(tmp / "work"), "db": str(tmp / "fb.db"), "model": "tiny-random-llama", "min_win_lower": -1.0,
        "reward": {"model": "tiny-random-llama", "max_steps": 1, "min_accuracy": 0.0, "max_length_corr": 1.0,
                   "quiet": True, "tensorboard": False},
        "policy": {"method": "dpo", "max_steps": 2, "batch_size": 2, "quiet": True, "tensorboard": False,
                   **(policy or {})},
        "eval": {"data": [str(prefs)], "max_prompts": 3, "max_new_tokens": 3}, **extra}))
    return path


@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """Round 1 with its DPO stage failing, then the same command again (it continues and promotes), then a run with
    no new feedback; the times and files each left behind."""
    tmp = tmp_path_factory.mktemp("loop")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    work = tmp / "work"
    loop_yaml(tmp, serve={"url": f"http://127.0.0.1:{server.server_port}", "admin_key_env": "LOOP_TEST_KEY"})
    argv = ["loop", "--config", tmp / "loop.yaml"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOP_TEST_KEY", "admin-secret")

        def killed(cfg, log):
            (Path(cfg.output_dir) / "model.safetensors").write_text("half a model")
            raise KeyboardInterrupt

        mp.setitem(loop.TRAINERS, "dpo", killed)
        first = run_cli(*argv)
        mp.undo()
        mp.setenv("LOOP_TEST_KEY", "admin-secret")
        stamps = {s: (work / "round-1" / s / "done.json").stat().st_mtime_ns for s in ("export", "reward", "gate")}
        current_after_kill = (work / "current.json").exists()
        second = run_cli(*argv)
        third = run_cli(*argv)
    server.shutdown()
    return {"work": work, "first": first, "second": second, "third": third, "stamps": stamps,
            "current_after_kill": current_after_kill, "posts": list(Recorder.seen)}


def test_a_killed_round_promotes_nothing_and_continues_where_it_stopped(looped):
    work = looped["work"]
    assert looped["first"].returncode == 130 and not looped["current_after_kill"]
    assert looped["second"].returncode == 0, looped["second"].stderr
    out = looped["second"].stdout
    for s in ("export", "reward", "gate"):  # the earlier stages were not redone
        assert (work / "round-1" / s / "done.json").stat().st_mtime_ns == looped["stamps"][s]
        assert f"round-1: {s} done at" in out
    assert "round-1: policy done at" not in out
    assert [p.name for p in work.glob("round-*")] == ["round-1"]


def test_promotion_lineage_and_the_server_told(looped):
    work = looped["work"]
    current = json.loads((work / "current.json").read_text())
    policy = work / "round-1" / "policy"
    assert current["round"] == 1 and current["policy"] == str(policy) and current["notified"] is True
    assert current["policy_sha256"].startswith("sha256:") and (policy / "model.safetensors").read_bytes()[:4] != b"half"
    lines = [json.loads(x) for x in (work / "lineage.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["round"] == 1 and line["decision"] == "promoted"
    assert line["data"]["all"]["counts"]["preferences"] == 6 and line["data"]["new"]["sha256"]
    assert line["policy"]["model"] == {"path": str(policy), "sha256": current["policy_sha256"]}
    assert line["policy"]["started_from"] == {"path": "tiny-random-llama", "sha256": None} and line["current"]["round"] == 0
    assert line["configs"]["policy"]["data"] == [str(work / "round-1" / "export" / "new" / "preferences.jsonl")]
    assert line["metrics"]["win_rate"]["ci95"][0] <= line["metrics"]["win_rate"]["mean"]
    assert line["checks"]["win_rate"]["ok"] and line["notify"]["ok"]
    assert line["notify"]["served_checkpoint"] == "sha256:served"  # what the server answered
    assert looped["posts"] == [{"path": "/admin/reload", "body": {"model": str(policy)}, "auth": "Bearer admin-secret"}]
    for s in loop.STAGES:
        assert json.loads((work / "round-1" / s / "done.json").read_text())["stage"] == s


def test_no_new_feedback_stops_without_training(looped):
    r = looped["third"]
    assert r.returncode == 0, r.stderr
    assert "round 2: no new feedback since the previous round" in r.stdout
    assert not (looped["work"] / "round-2").exists()
    assert len((looped["work"] / "lineage.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------- pieces without a model


def plan(tmp_path, **extra):
    return loop.plan_of(build_config(LoopConfig, {"work_dir": str(tmp_path / "work"), "db": str(tmp_path / "fb.db"),
                                                  "policy": {"method": "ppo"}, **extra}))


def test_the_human_weight_follows_its_schedule_across_rounds(tmp_path):
    p = plan(tmp_path, human_weight="linear:1.0:0.2:4")
    assert [loop.human_share(p, r, ["ratings.jsonl"]) for r in (1, 3, 5, 9)] == [
        {"rm": "0", "human": "1"}, {"rm": "0.4", "human": "0.6"}, {"rm": "0.8", "human": "0.2"},
        {"rm": "0.8", "human": "0.2"}]
    assert loop.human_share(p, 1, []) == {"rm": "1"}  # no ratings this round: the reward model alone
    assert loop.human_share(plan(tmp_path), 1, ["ratings.jsonl"]) is None
    with pytest.raises(UsageError, match="human_weight and policy.reward_weights"):
        plan(tmp_path, human_weight="0.5", policy={"method": "grpo", "reward_weights": {"rm": "1"}})


def test_export_keeps_apart_what_is_new_since_the_last_promotion(tmp_path):
    p = plan(tmp_path)
    store = Store(p.db)
    user = store.add_user("ann", "correct horse").id
    items = []
    for i in range(5):
        pid = store.add_prompt([{"role": "user", "content": f"question {i}"}])
        items.append(store.add_item("compare", store.add_reply(pid, f"yes {i}"), store.add_reply(pid, f"no {i}")))

    def answer(n):
        for _ in range(n):
            store.submit(user, store.lease(user), choice="b")

    answer(3)
    first = loop.export_stage(p, tmp_path / "e1", None, None)
    assert first["new"]["counts"]["preferences"] == 3 and first["all"]["counts"]["preferences"] == 3
    answer(2)
    second = loop.export_stage(p, tmp_path / "e2", {**first, "round": 1}, first["all"]["dir"])
    assert second["all"]["counts"]["preferences"] == 5 and second["new"]["counts"]["preferences"] == 2
    new = [json.loads(x)["prompt"][0]["content"] for x in (tmp_path / "e2" / "new" / "preferences.jsonl").open()]
    assert new == ["question 3", "question 4"]
    again = loop.export_stage(p, tmp_path / "e3", {**second, "round": 2}, first["all"]["dir"])
    assert again["new"] is None and "no new feedback since the previous round" in again["why"]
    store.engine.dispose()


def test_a_stage_continues_from_its_checkpoints_or_starts_afresh(tmp_path):
    rdir = tmp_path / "round-1"
    seen = []

    def dies(out, resume):
        seen.append(resume)
        (out / "partial.txt").write_text("x")
        if len(seen) == 2:
            (out / "checkpoints" / "step-2").mkdir(parents=True)
            (out / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt

    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            loop.stage(rdir, "policy", dies, log=lambda m: None)
    assert seen == [False, False] and not (rdir / "policy" / "done.json").exists()
    got = loop.stage(rdir, "policy", lambda out, resume: {"resumed": resume, "kept": (out / "partial.txt").exists()},
                     log=lambda m: None)
    assert got == {"resumed": True, "kept": True}  # a trainer's checkpoint is continued from
    assert loop.stage(rdir, "policy", dies, log=lambda m: None) == got  # done: never run again
    with pytest.raises(KeyboardInterrupt):
        loop.stage(rdir, "eval", dies, log=lambda m: None)
    assert loop.stage(rdir, "eval", lambda out, resume: sorted(p.name for p in out.iterdir()), log=print) == []


def test_a_failed_notify_is_kept_and_retried(tmp_path, monkeypatch):
    from conftest import free_port

    port = free_port()
    p = plan(tmp_path, serve={"url": f"http://127.0.0.1:{port}", "admin_key_env": "LOOP_TEST_KEY"})
    p.work.mkdir()
    loop.write_json(p.work / "current.json", {"round": 1, "policy": "/m/round-1/policy", "notified": None})
    logged = []
    assert loop.notify(p, logged.append)["error"] == "the admin key variable LOOP_TEST_KEY is not set"
    monkeypatch.setenv("LOOP_TEST_KEY", "k3y")
    failed = loop.notify(p, logged.append)
    assert failed["ok"] is False and "ConnectError" in failed["error"] and "the promotion stands" in logged[-1]
    assert json.loads((p.work / "current.json").read_text())["notified"] is False
    Recorder.seen.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Recorder)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        assert loop.notify(p, logged.append)["ok"] is True
        assert loop.notify(p, logged.append) is None  # told once
    finally:
        server.shutdown()
        server.server_close()
    assert Recorder.seen == [{"path": "/admin/reload", "body": {"model": "/m/round-1/policy"}, "auth": "Bearer k3y"}]


def test_the_example_config_reads():
    from conftest import EXAMPLES

    p = loop.plan_of(build_config(LoopConfig, {}, str(EXAMPLES / "loop.yaml")))
    assert p.method == "dpo" and p.policy["lora_r"] == 16 and p.reward["eval_fraction"] == 0.2
    assert p.serve == {"url": "http://127.0.0.1:8000", "admin_key_env": "CHATRLHF_ADMIN_KEY"}



def test_round_numbers_are_never_reused_and_every_finished_round_gets_its_line(tmp_path):
    p = plan(tmp_path)
    (p.work / "round-1").mkdir(parents=True)
    loop.write_json(p.work / "round-1" / "round.json", {"round": 1, "decision": "refused"})  # died before its line
    (p.work / "round-2").mkdir()  # unfinished
    assert loop.next_round(p, log=lambda m: None) == (2, p.work / "round-2")
    loop.catch_up_lineage(p)
    loop.catch_up_lineage(p)
    assert loop.logged_rounds(p.work) == [1]
    loop.write_json(p.work / "round-2" / "round.json", {"round": 2, "decision": "promoted"})
    loop.catch_up_lineage(p)
    shutil.rmtree(p.work / "round-2")  # deleted by hand: its number stays taken
    assert loop.logged_rounds(p.work) == [1, 2] and loop.next_round(p)[0] == 3
    (p.work / "round-3").mkdir()
    p.resume = False
    assert loop.next_round(p, log=lambda m: None) == (3, p.work / "round-3") and not (p.work / "round-3").exists()
