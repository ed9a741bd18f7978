"""The closed loop (`chatrlhf loop`): round after round, the feedback collected since the last round improves the
reward model and the policy, and a candidate replaces the current policy only when it is measurably better.

A round R is a sequence of stages, each writing into WORK/round-R/<stage>/ and, once it has finished, a done.json
there (its result); a rerun skips every stage that has one and continues at the first that has not (a trainer
killed after a checkpoint continues from it, one killed before starts its stage afresh):

    export ─► reward ─► gate ─► policy ─► eval ─► decide ─► promote ─► (tell the server)
      │                  │                          │
      └ no new feedback: └ the reward model failed  └ a check failed: refused, with the reasons
        the loop stops     its gate: round stopped

The loop is orchestration only: every stage is an existing command's entry point (feedback export, reward train,
the dpo / kto / ppo / grpo / bestofn trainers, eval) run with a config built from the YAML's section for it plus
the paths the loop owns (config.LOOP_OWNS). What is promoted is written to WORK/current.json in one step (a temporary
file renamed over it), and only by the promote stage, which runs after the decision, which reads only finished
stages: a killed round never promotes a half-trained model. Every finished round appends one line to
WORK/lineage.jsonl (data hashes, model folders and their hashes, configs, metrics, the decision and why).

Which data a round trains on: the export is of all the feedback in the store (its manifest hashes it); a round whose
export is the previous round's byte for byte has no new feedback. The rows new since the last promotion (keyed by
item and annotator) are written apart, to export/new: dpo and kto train the current policy on them, and with
--reward-start continue the reward model continues on them; --reward-start retrain trains it on everything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path

import httpx

from chatrlhf.config import LOOP_METHODS, LOOP_OWNS, EvalConfig, FeedbackQueueConfig, LoopConfig, ModelArgs, \
    RewardTrainConfig, config_dict, loop_method, stage_values
from chatrlhf.errors import UsageError
from chatrlhf.evaluate.bias import bias_check
from chatrlhf.evaluate.report import run_eval
from chatrlhf.feedback import active
from chatrlhf.feedback.export import export
from chatrlhf.feedback.store import Store, content_hash, weights_hash
from chatrlhf.reward_model import check_gate, load_reward_model, scored_heads
from chatrlhf.rewards import Schedule, parse_schedules
from chatrlhf.trainers import bestofn, dpo, grpo, kto, ppo, sft
from chatrlhf.trainers import reward as reward_trainer
from chatrlhf.trainers.run import checkpoints

# The stages of a round, in order ("promote" only when the decision says so; "queue", active selection of the next
# round's labels, after the decision either way).
STAGES = ("export", "reward", "gate", "policy", "eval", "decide", "promote", "queue")
EXPORT_FILES = ("preferences", "ratings", "corrections", "conversations")
POLICY_DATA = {"dpo": ("preferences", "ratings", "corrections"), "kto": ("ratings", "corrections", "preferences"),
               "prompts": ("preferences", "ratings", "corrections")}
TRAINERS = {"dpo": dpo.train, "kto": kto.train, "ppo": ppo.train, "grpo": grpo.train,
            "bestofn": lambda cfg, log: bestofn.train(cfg, fine_tune=sft.train, log=log)}


@dataclasses.dataclass
class Plan:
    """The loop's config read and checked once: every stage's own values, typed (config.stage_values)."""
    work: Path
    db: str
    model: str
    rounds: int
    resume: bool
    rule: str
    reward_start: str
    human_weight: Schedule | None
    checks: list[str]
    min_win_lower: float
    max_kl: float
    reward: dict
    method: str
    policy: dict
    eval: dict
    serve: dict
    queue: dict


def plan_of(cfg: LoopConfig) -> Plan:
    if cfg.rounds < 1:
        raise UsageError(f"--rounds {cfg.rounds}: must be at least 1", "the rounds to run now, e.g. 3")
    method, policy = loop_method(cfg.policy, "the loop's config (--config YAML or --policy)")
    human = parse_schedules({"human": cfg.human_weight}, "human_weight")["human"] if cfg.human_weight else None
    if human is not None and method in ("dpo", "kto"):
        raise UsageError(f"human_weight with policy.method {method}: {method} trains on the human labels directly, "
                         "no reward is mixed", "remove human_weight, or use ppo, grpo or bestofn")
    if human is not None and "reward_weights" in policy:
        raise UsageError("human_weight and policy.reward_weights both set the reward's weights",
                         "give one of them: human_weight schedules human against rm across rounds")
    return Plan(Path(cfg.work_dir), cfg.db, cfg.model, cfg.rounds, cfg.resume, cfg.rule, cfg.reward_start, human,
                list(cfg.checks), cfg.min_win_lower, cfg.max_kl,
                stage_values(RewardTrainConfig, cfg.reward, "--reward", LOOP_OWNS["reward"]), method, policy,
                stage_values(EvalConfig, cfg.eval, "--eval", LOOP_OWNS["eval"]),
                {"url": str(cfg.serve["url"]).rstrip("/"),
                 "admin_key_env": str(cfg.serve.get("admin_key_env", "CHATRLHF_ADMIN_KEY"))} if cfg.serve else {},
                stage_values(FeedbackQueueConfig, cfg.queue, "--queue", LOOP_OWNS["queue"]))


# --------------------------------------------------------------------------- files


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_json(path: Path, data: dict) -> None:
    """``path`` replaced in one step (a temporary file renamed over it): a reader sees the old or the new, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the real one
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_ref(folder: str | None) -> dict | None:
    return None if folder is None else {"path": str(folder), "sha256": weights_hash(folder)}


def current(plan: Plan) -> dict:
    """WORK/current.json: the promoted policy, its reward model and export; before any promotion, --model alone."""
    return read_json(plan.work / "current.json") or {"round": 0, "policy": plan.model, "reward_model": None,
                                                     "export": None}


# --------------------------------------------------------------------------- the stage scaffold


def stage(rdir: Path, name: str, fn, log=print):
    """Run stage ``name`` of the round in ``rdir`` unless its done.json says it finished (then its result is read
    back). ``fn(out, resume)`` gets the stage folder, and resume=True when a killed trainer left checkpoints there;
    a folder without them is started afresh. The result is written to done.json last."""
    out = rdir / name
    done = read_json(out / "done.json")
    if done is not None:
        log(f"chatrlhf loop: {rdir.name}: {name} done at {done['finished_at']} (kept)")
        return done["result"]
    resume = bool(checkpoints(out))
    if out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = fn(out, resume)
    write_json(out / "done.json", {"stage": name, "finished_at": now(), "seconds": round(time.perf_counter() - t0, 2),
                                   "resumed": resume, "result": result})
    return result


def interrupted(summary) -> None:
    if summary.interrupted:  # Ctrl-C: the trainer saved a checkpoint; the next run continues there
        raise KeyboardInterrupt


# --------------------------------------------------------------------------- export


def row_keys(export_dir: str | None) -> set[tuple]:
    """(file, item, annotator) of every row of an export: what a later export holds that this one did not is new."""
    keys = set()
    for name in EXPORT_FILES if export_dir else ():
        path = Path(export_dir) / f"{name}.jsonl"
        keys |= {row_key(name, line) for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else [])}
    return keys


def row_key(name: str, line: str) -> tuple:
    row = json.loads(line)
    return name, row.get("item_id"), row.get("annotator")


def export_stage(plan: Plan, out: Path, previous: dict | None, promoted_export: str | None) -> dict:
    """The whole store to out/all (with its manifest), and the rows new since the last promotion to out/new."""
    store = Store(plan.db)
    try:
        manifest = export(store, out / "all", plan.rule)
    finally:
        store.engine.dispose()
    result = {"all": {"dir": str(out / "all"), "sha256": manifest["sha256"], "counts": manifest["counts"]}}
    if previous is not None and previous["all"]["sha256"] == manifest["sha256"]:
        return {**result, "new": None, "why": "no new feedback since the previous round (the same export hash)"}
    seen = row_keys(promoted_export)
    (out / "new").mkdir()
    counts, files = {}, []
    for name in EXPORT_FILES:
        path = out / "all" / f"{name}.jsonl"
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if row_key(name, line) not in seen]
        files.append(out / "new" / f"{name}.jsonl")
        files[-1].write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        counts[name] = len(rows)
    if not any(counts.values()):
        return {**result, "new": None, "why": "no new answers since the last promotion"}
    return {**result, "new": {"dir": str(out / "new"), "sha256": content_hash(files), "counts": counts,
                              "since_round": previous and previous.get("round")}}


def data_files(part: dict, names: tuple[str, ...]) -> list[str]:
    """The files of an export part (``all`` or ``new``) among ``names`` that have rows."""
    return [str(Path(part["dir"]) / f"{n}.jsonl") for n in names if part["counts"].get(n)]


# --------------------------------------------------------------------------- reward, policy, eval


def reward_stage(plan: Plan, start: dict, ex: dict, out: Path, resume: bool, log) -> dict:
    go_on = plan.reward_start == "continue" and start["reward_model"]
    part = ex["new"] if go_on else ex["all"]
    files = data_files(part, ("preferences", "ratings", "corrections"))
    if not files:
        raise UsageError(f"{part['dir']}: no preferences, ratings or corrections to train the reward model on",
                         "collect comparisons or ratings in the feedback store")
    values = {**plan.reward, **({"model": start["reward_model"]} if go_on else {})}
    cfg = RewardTrainConfig(**{**values, "data": files, "output_dir": str(out), "resume": resume})
    summary = reward_trainer.train(cfg, log=log)
    interrupted(summary)
    return {"model": model_ref(out), "started_from": model_ref(cfg.model), "data": files,
            "accuracy": summary["accuracy"], "ece": summary["ece"], "gate": summary["gate"], "config": config_dict(cfg)}


def human_share(plan: Plan, number: int, human_files: list[str]) -> dict | None:
    """--human-weight at round ``number`` as reward weights (human W, reward model 1 − W), or None."""
    if plan.human_weight is None:
        return None
    w = min(max(plan.human_weight(number - 1), 0.0), 1.0)
    return {"rm": f"{1 - w:g}", "human": f"{w:g}"} if human_files else {"rm": "1"}


def policy_stage(plan: Plan, number: int, start: dict, ex: dict, rm: str, out: Path, resume: bool, log) -> dict:
    fixed = {"model": start["policy"], "output_dir": str(out), "resume": resume}
    if plan.method in ("dpo", "kto"):
        fixed["data"] = data_files(ex["new"], POLICY_DATA[plan.method])
    else:
        human = data_files(ex["new"], ("ratings", "corrections"))
        fixed.update(reward_model=rm, human_feedback=human)
        fixed.update({"sft": True} if plan.method == "bestofn" else {})
        fixed.update({"data": data_files(ex["new"], POLICY_DATA["prompts"])} if "data" not in plan.policy else {})
        weights = human_share(plan, number, human)
        fixed.update({"reward_weights": weights} if weights else {})
    if not fixed.get("data", True):
        raise UsageError(f"{ex['new']['dir']}: no new feedback that {plan.method} can train on",
                         "see docs/loop.md for what each method reads")
    cfg = LOOP_METHODS[plan.method](**{**plan.policy, **fixed})
    summary = TRAINERS[plan.method](cfg, log=log)
    interrupted(summary)
    figures = {k: summary.results.get(k) for k in ("eval_start", "eval_end", "rounds") if k in summary.results}
    return {"method": plan.method, "model": model_ref(out), "started_from": model_ref(start["policy"]),
            "reward_weights": fixed.get("reward_weights"), "figures": figures, "config": config_dict(cfg)}


def eval_stage(plan: Plan, start: dict, candidate: str, rm: str, out: Path, log) -> dict:
    cfg = EvalConfig(**{**plan.eval, "model": candidate, "baseline": start["policy"], "reward_model": rm,
                        "output_dir": str(out), **({"bias": True} if "bias" in plan.checks else {})})
    report = run_eval(cfg, log)
    rouge = {side: m.get("rouge_l") for side, m in report["metrics"].items()}
    return {"win_rate": report.get("win_rate"), "kl": report.get("kl_to_baseline"), "rouge_l": rouge,
            "rewards": report.get("rewards"), "bias": report.get("bias"), "report": str(out / "report.html"),
            "config": config_dict(cfg)}


# --------------------------------------------------------------------------- the decision


def win_rate_check(ev: dict, min_lower: float) -> tuple[bool, str]:
    """The reward model's win rate of the candidate over the current policy: its 95% CI's lower end > min_lower."""
    w = ev.get("win_rate")
    if not w:
        return False, "no win rate: the evaluation had no reward model to judge the replies"
    lo, hi = w["ci95"]
    text = f"win rate {w['mean']:.3f} (95% CI {lo:.3f}–{hi:.3f})"
    if lo > min_lower:
        return True, f"{text}: the CI's lower end is above {min_lower:g}"
    return False, f"{text}: the CI's lower end is not above {min_lower:g}, so the candidate is not shown to be better"


def kl_check(ev: dict, max_kl: float) -> tuple[bool, str]:
    """KL(candidate ‖ current policy), nats per reply, at most max_kl."""
    kl = ev.get("kl")
    if not kl:
        return False, "no KL: the candidate and the current policy do not share a vocabulary"
    ok = kl["mean"] <= max_kl
    return ok, f"KL to the current policy {kl['mean']:.3f} nats/reply {'within' if ok else 'above'} {max_kl:g}"


def bias_gate(ev: dict) -> tuple[bool, str]:
    """The bias probe of the candidate (evaluate/bias): no max gap between groups whose family-wise 95% CI excludes 0
    and that is over the eval section's bias_threshold."""
    if not ev.get("bias"):
        return False, "no bias report: the evaluation ran without the bias probe"
    ok, reasons = bias_check(ev["bias"])
    return ok, "; ".join(reasons) if reasons else f"no gap between groups over {ev['bias']['threshold']:g}"


def checks_of(plan: Plan, ev: dict) -> dict[str, tuple[bool, str]]:
    """The configured checks, name → (ok, reason)."""
    builtin = {"win_rate": lambda: win_rate_check(ev, plan.min_win_lower), "kl": lambda: kl_check(ev, plan.max_kl),
               "bias": lambda: bias_gate(ev)}
    return {name: builtin[name]() for name in plan.checks}


def decide(checks: dict[str, tuple[bool, str]]) -> dict:
    """Promote only when there is at least one check and every check passed; the reasons say why either way."""
    failed = [f"{name}: {why}" for name, (ok, why) in checks.items() if not ok]
    promote = bool(checks) and not failed
    reasons = failed or ([f"{name}: {why}" for name, (_, why) in checks.items()] or ["no checks configured"])
    return {"promote": promote, "reasons": reasons,
            "checks": {name: {"ok": ok, "reason": why} for name, (ok, why) in checks.items()}}


# --------------------------------------------------------------------------- promotion and the server


def promote(plan: Plan, number: int, pol: dict, rm: dict, ex: dict) -> dict:
    """WORK/current.json now names the candidate, written in one step; the server is told afterwards."""
    record = {"round": number, "policy": pol["model"]["path"], "policy_sha256": pol["model"]["sha256"],
              "reward_model": rm["model"]["path"], "reward_model_sha256": rm["model"]["sha256"],
              "export": ex["all"]["dir"], "promoted_at": now(), "notified": None}
    write_json(plan.work / "current.json", record)
    return record


def notify(plan: Plan, log=print) -> dict | None:
    """POST {url}/admin/reload {"model": the promoted folder} with the admin key, if the promotion in current.json
    has not been told yet; the outcome is kept in current.json (a failure is retried by the next run or round)."""
    record = read_json(plan.work / "current.json")
    if not plan.serve or record is None or record.get("notified") is True:
        return None
    url, env = f"{plan.serve['url']}/admin/reload", plan.serve["admin_key_env"]
    key = os.environ.get(env, "")
    outcome = {"url": url, "model": record["policy"], "at": now()}
    if not key:
        outcome.update(ok=False, error=f"the admin key variable {env} is not set")
    else:
        try:
            r = httpx.post(url, json={"model": record["policy"]}, headers={"Authorization": f"Bearer {key}"},
                           timeout=600)  # the server answers once it has loaded the model and switched
            outcome.update(ok=r.is_success, status=r.status_code,
                           **({"served_checkpoint": served_checkpoint(r)} if r.is_success else {"error": r.text[:300]}))
        except httpx.HTTPError as e:
            outcome.update(ok=False, error=f"{type(e).__name__}: {e}")
    write_json(plan.work / "current.json", {**record, "notified": outcome["ok"], "notify": outcome})
    log(f"chatrlhf loop: told {url} to load {record['policy']}" if outcome["ok"] else
        f"chatrlhf loop: warning: could not tell {url} to load {record['policy']} ({outcome['error']}); the "
        "promotion stands and the next run retries")
    return outcome


def served_checkpoint(response) -> str | None:
    """The checkpoint hash the server says it now serves (serve/admin.py answers {"model", "checkpoint", …}): the
    promoted folder's own ``policy_sha256`` when the right weights were loaded."""
    try:
        return response.json().get("checkpoint")
    except (ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- rounds


def round_dirs(work: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-", 1)[1]), p) for p in work.glob("round-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted(found)


def logged_rounds(work: Path) -> list[int]:
    """The round numbers in WORK/lineage.jsonl."""
    path = work / "lineage.jsonl"
    return [json.loads(x)["round"] for x in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else [])]


def next_round(plan: Plan, log=print) -> tuple[int, Path]:
    """The unfinished round (continued, or with --no-resume started afresh), else a new one."""
    rounds = round_dirs(plan.work)
    if rounds and not (rounds[-1][1] / "round.json").is_file():
        number, rdir = rounds[-1]
        if plan.resume:
            log(f"chatrlhf loop: continuing round {number} at its first unfinished stage")
            return number, rdir
        log(f"chatrlhf loop: --no-resume: round {number} is started afresh")
        shutil.rmtree(rdir)
        return number, rdir
    number = max([k for k, _ in rounds] + logged_rounds(plan.work) + [0]) + 1  # never reused, even once deleted
    return number, plan.work / f"round-{number}"


def previous_export(plan: Plan, number: int) -> dict | None:
    """The export result of the latest earlier round, with its number."""
    for k, rdir in reversed(round_dirs(plan.work)):
        done = read_json(rdir / "export" / "done.json")
        if k < number and done is not None:
            return {**done["result"], "round": k}
    return None


def loop_settings(plan: Plan) -> dict:
    """The loop's own settings, for the lineage."""
    return {"rule": plan.rule, "reward_start": plan.reward_start, "checks": plan.checks,
            "min_win_lower": plan.min_win_lower, "max_kl": plan.max_kl,
            "human_weight": plan.human_weight and dataclasses.asdict(plan.human_weight)}


def run_round(plan: Plan, number: int, rdir: Path, log=print) -> dict:
    """One round, stage by stage; returns its lineage line (decision: promoted, refused, stopped or no-feedback)."""
    start = current(plan)
    ex = stage(rdir, "export", lambda out, _: {**export_stage(plan, out, previous_export(plan, number), start["export"]),
                                               "current": start}, log)
    start = ex["current"]  # what was current when the round began, even when it is continued after its promotion
    line = {"round": number, "current": {"round": start["round"], **model_ref(start["policy"])}}
    line["data"] = {k: v and {x: v[x] for x in ("sha256", "counts")} for k, v in ex.items() if k in ("all", "new")}
    if ex["new"] is None:
        return {**line, "decision": "no-feedback", "reasons": [ex["why"]]}
    rm = stage(rdir, "reward", lambda out, resume: reward_stage(plan, start, ex, out, resume, log), log)
    line.update(reward={k: rm[k] for k in ("model", "started_from", "accuracy", "ece", "gate")},
                configs={"loop": loop_settings(plan), "reward": rm["config"]})
    gate = stage(rdir, "gate", lambda out, _: {"reasons": check_gate(rm["model"]["path"])}, log)
    if gate["reasons"]:
        return {**line, "decision": "stopped", "reasons": [f"reward model gate: {r}" for r in gate["reasons"]]}
    rm_path = rm["model"]["path"]
    pol = stage(rdir, "policy", lambda out, resume: policy_stage(plan, number, start, ex, rm_path, out, resume, log),
                log)
    line.update(policy={k: pol[k] for k in ("method", "model", "started_from", "reward_weights", "figures")})
    line["configs"]["policy"] = pol["config"]
    ev = stage(rdir, "eval", lambda out, _: eval_stage(plan, start, pol["model"]["path"], rm_path, out, log), log)
    line.update(metrics={k: ev[k] for k in ("win_rate", "kl", "rouge_l", "rewards")}, report=ev["report"])
    line["configs"]["eval"] = ev["config"]
    verdict = stage(rdir, "decide", lambda out, _: decide(checks_of(plan, ev)), log)
    line.update(checks=verdict["checks"], reasons=verdict["reasons"])
    if verdict["promote"]:
        stage(rdir, "promote", lambda out, _: promote(plan, number, pol, rm, ex), log)
        notify(plan, log)  # (a run that died after the promotion has told the server at its start: outcome kept)
        line.update(decision="promoted", notify=read_json(plan.work / "current.json").get("notify"))
    line["queue"] = stage(rdir, "queue", lambda out, _: queue_stage(plan, number, rm_path, log), log)
    return {"decision": "refused", **line}


def queue_stage(plan: Plan, number: int, rm: str, log=print) -> dict:
    """Active selection (feedback/active.py): the next round's items, chosen among the replies no item holds yet and
    scored by this round's reward model; nothing without a queue section."""
    if not plan.queue:
        return {"queued": 0, "why": "no queue section"}
    q = FeedbackQueueConfig(**plan.queue)
    model, tok = load_reward_model(ModelArgs(model=rm))
    out = active.queue(Store(plan.db), q.strategy, q.count, q.kind,
                       lambda prompts, replies: scored_heads(model, tok, prompts, replies), q.k, number + 1, q.seed)
    log(f"chatrlhf loop: queued {out['queued']} {q.kind} items ({q.strategy}) of {out['candidates']} candidates "
        f"for round {number + 1}")
    return {k: v for k, v in out.items() if k != "items"} | {"strategy": q.strategy, "kind": q.kind}


def finish_round(plan: Plan, rdir: Path, line: dict) -> None:
    """round.json (the round is over), then its lineage line (:func:`catch_up_lineage` appends it if a run dies in
    between)."""
    write_json(rdir / "round.json", {**line, "finished_at": now()})
    catch_up_lineage(plan)


def catch_up_lineage(plan: Plan) -> None:
    """Append the line of every finished round (its round.json) that WORK/lineage.jsonl does not have yet."""
    logged = set(logged_rounds(plan.work))
    for number, rdir in round_dirs(plan.work):
        line = read_json(rdir / "round.json")
        if line is not None and number not in logged:
            with (plan.work / "lineage.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(line, default=str) + "\n")


def run(cfg: LoopConfig, log=print) -> list[dict]:
    """--rounds rounds (fewer when a round finds no new feedback); their lineage lines."""
    plan = plan_of(cfg)
    plan.work.mkdir(parents=True, exist_ok=True)
    catch_up_lineage(plan)  # a round that finished just before a crash
    notify(plan, log)  # a promotion the server was not told about yet
    lines = []
    for _ in range(plan.rounds):
        number, rdir = next_round(plan, log)
        rdir.mkdir(parents=True, exist_ok=True)
        line = run_round(plan, number, rdir, log)
        if line["decision"] == "no-feedback":  # nothing to learn from: the round is not kept
            shutil.rmtree(rdir)
            log(f"chatrlhf loop: round {number}: {line['reasons'][0]}; nothing trained, stopping")
            return lines
        finish_round(plan, rdir, line)
        log(f"chatrlhf loop: round {number}: {line['decision']}: " + "; ".join(line["reasons"]))
        lines.append(line)
    return lines
