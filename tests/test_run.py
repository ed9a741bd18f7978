"""The run scaffold (trainers/run.py): exact save → load of named parts, the summary, Ctrl-C, resume of logs."""
import json
import random
import signal
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from chatrlhf.config import ModelArgs, RunArgs
from chatrlhf.errors import UsageError
from chatrlhf.logger import read_metrics
from chatrlhf.trainers.common import make_optimizer, optimizer_step
from chatrlhf.trainers.run import Run, StopFlag, Summary, checkpoints, load_checkpoint, save_checkpoint


@dataclass
class Cfg(RunArgs, ModelArgs):
    pass


def cfg(out, **kw) -> Cfg:
    return Cfg(output_dir=str(out), device="cpu", dtype="float32", tensorboard=False, quiet=True, seed=3, **kw)


def parts_of(seed: int):
    """A little network with dropout, its AdamW and linear schedule, a random stream of its own."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    net[0].bias.requires_grad_(False)  # frozen: not in the checkpoint, must stay as built
    opt, sched = make_optimizer([p for p in net.parameters() if p.requires_grad], 1e-2, 0.0, warmup_steps=2,
                                total_steps=10)
    g = torch.Generator()
    g.manual_seed(seed + 1)
    return net, opt, sched, g


def train_step(net, opt, sched, g) -> float:
    """A step that uses every random source: numpy and Python (data), the global torch RNG (dropout), ``g``."""
    x = torch.randn(5, 4, generator=g) + float(np.random.rand()) + random.random()
    loss = net(x).pow(2).mean()
    loss.backward()
    optimizer_step(opt, sched, [p for p in net.parameters() if p.requires_grad], 1.0)
    return float(loss.detach())


def test_save_then_load_restores_weights_optimizer_schedule_rng_and_generators_exactly(tmp_path):
    net, opt, sched, g = parts_of(0)
    for _ in range(3):
        train_step(net, opt, sched, g)
    save_checkpoint(tmp_path, 3, {"net": (net, opt, sched)}, {"beta": 0.5}, generators={"g": g})
    want = [train_step(net, opt, sched, g) for _ in range(4)]
    want_weights = {k: v.clone() for k, v in net.state_dict().items()}

    net2, opt2, sched2, g2 = parts_of(0)        # built as the run builds them: fresh optimizer and stream ...
    with torch.no_grad():
        net2[2].weight.normal_()                # ... other trainable weights, other random states
    g2.manual_seed(99)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    state = load_checkpoint(checkpoints(tmp_path)[-1][1], {"net": (net2, opt2, sched2)}, {"g": g2})
    assert state == {"beta": 0.5}
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3
    got = [train_step(net2, opt2, sched2, g2) for _ in range(4)]
    assert got == want                          # bit for bit: dropout, data, generator and Adam moments all match
    for k, v in net2.state_dict().items():
        assert torch.equal(v, want_weights[k]), k


def test_checkpoints_keep_the_latest_two_and_a_resumed_step_names_its_folder(tmp_path):
    net, opt, sched, _ = parts_of(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"m": (net, opt, sched)}, {})
    assert [s for s, _ in checkpoints(tmp_path)] == [2, 3]
    assert json.loads((checkpoints(tmp_path)[-1][1] / "trainer_state.json").read_text()) == {"step": 3}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_summary_is_a_dataclass_written_as_the_same_json_keys(tmp_path):
    s = Summary("reward train", 8, results={"accuracy": 0.75, "gate": {"passed": False}})
    assert not s.interrupted and s["accuracy"] == 0.75 and s["steps"] == 8
    s.write(tmp_path)
    assert json.loads((tmp_path / "chatrlhf.json").read_text()) == {"command": "reward train", "steps": 8,
                                                                      "accuracy": 0.75, "gate": {"passed": False}}
    stopped = Summary("sft", 3, interrupted=True)
    assert stopped.interrupted and "interrupted" not in stopped.as_json()
    with pytest.raises(KeyError):
        stopped["eval_loss_end"]


def test_first_ctrl_c_asks_to_stop_the_second_aborts_and_the_old_handler_comes_back(capsys):
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert signal.getsignal(signal.SIGINT) == stop.handler and not stop.stop
        stop.handler(signal.SIGINT, None)
        assert stop.stop and "saving a checkpoint after this step" in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            stop.handler(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == before


def run_steps(out, total: int, resume: bool = False, stop_at: int | None = None, late: bool = False):
    """A scaffolded loop like the trainers': (summary, losses by step)."""
    run = Run("toy", cfg(out, save_steps=2, resume=resume), log=lambda *a: None)
    net, opt, sched, g = parts_of(run.cfg.seed)
    state = run.begin({"net": (net, opt, sched)}, {"g": g}, state={"seen": 0})
    rows = run.open_rows("rows.jsonl")
    step = run.step
    with run.loop(total):
        while run.running(step, total):
            loss = train_step(net, opt, sched, g)
            step += 1
            state["seen"] += 5
            run.log(step, {"train/loss": loss})
            rows.write(json.dumps({"step": step}) + "\n")
            if step == stop_at and not late:
                run._stop.handler()       # what a first Ctrl-C does, during the step
            run.end_step(step, total, info=f"loss {loss:.3f}")
            if step == stop_at and late:
                run._stop.handler()       # ... or after the step's end
    rows.close()
    if step < total:
        return run.stopped(), None
    return run.finish({"seen": state["seen"]}), {m["step"]: m["train/loss"] for m in read_metrics(out)}


@pytest.mark.parametrize("late", [False, True])
def test_a_run_stopped_by_ctrl_c_resumes_to_the_uninterrupted_losses(tmp_path, capsys, late):
    ref, want = run_steps(tmp_path / "ref", 7)
    assert not ref.interrupted and ref["seen"] == 35 and ref["config"]["save_steps"] == 2
    assert json.loads((tmp_path / "ref" / "chatrlhf.json").read_text())["steps"] == 7

    stopped, _ = run_steps(tmp_path / "cut", 7, stop_at=3, late=late)
    assert stopped.interrupted and stopped.steps == 3 and [s for s, _ in checkpoints(tmp_path / "cut")] == [2, 3]
    assert not (tmp_path / "cut" / "chatrlhf.json").exists()
    # as after a SIGKILL: the log and the rows file ran past the last checkpoint
    save = tmp_path / "cut" / "metrics.jsonl"
    save.write_text(save.read_text() + json.dumps({"step": 4, "train/loss": 9.0}) + "\n")
    (tmp_path / "cut" / "rows.jsonl").open("a").write(json.dumps({"step": 4}) + "\n")

    done, got = run_steps(tmp_path / "cut", 7, resume=True)
    assert got == want and done["seen"] == 35 and done.steps == 7
    rows = [json.loads(x)["step"] for x in (tmp_path / "cut" / "rows.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 8))


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    run = Run("toy", cfg(tmp_path, resume=True), log=lambda *a: None)
    net, opt, sched, _ = parts_of(0)
    with pytest.raises(UsageError, match="no checkpoint in") as e:
        run.begin({"net": (net, opt, sched)})
    assert "drop --resume" in str(e.value.hint if hasattr(e.value, "hint") else e.value)


def test_one_process_is_the_main_one_and_reduce_is_the_identity(tmp_path):
    run = Run("toy", cfg(tmp_path), log=lambda *a: None)
    assert run.is_main and (run.rank, run.world_size) == (0, 1) and run.device == torch.device("cpu")
    assert run.reduce({"a": 1.0}) == {"a": 1.0}
    assert run.total_steps(10) == 10   # --epochs 1 × 10 steps per epoch (--max-steps -1)


def test_objects_are_saved_whole_and_restored_exactly_on_resume(tmp_path):
    """Objects with state_dict/load_state_dict that are no (module, optimizer, scheduler) part — a replay buffer,
    frozen target copies — go into the checkpoint whole and come back on --resume."""
    from chatrlhf.qnet import QHeads, ReplayBuffer

    def build(seed):
        torch.manual_seed(seed)
        heads, buffer = QHeads(4, n_heads=2, hidden=8), ReplayBuffer(5, 4, 3)
        opt, sched = make_optimizer(list(heads.online.parameters()), 1e-2, 0.0, warmup_steps=0, total_steps=10)
        return heads, buffer, opt, sched

    heads, buffer, opt, sched = build(0)
    for i in range(7):  # wraps the ring
        buffer.add(torch.randn(4), float(i), i % 2 == 0, torch.randn(2, 4))
    with torch.no_grad():
        heads.targets[0][0].weight.add_(1.0)   # targets differ from the online heads
    run = Run("toy", cfg(tmp_path), log=lambda *a: None)
    run.begin({"q": (heads, opt, sched)}, objects={"buffer": buffer, "q_targets": heads.targets})
    run.step = 4
    run.save()
    run.logger.close()

    heads2, buffer2, opt2, sched2 = build(1)
    run2 = Run("toy", cfg(tmp_path, resume=True), log=lambda *a: None)
    run2.begin({"q": (heads2, opt2, sched2)}, objects={"buffer": buffer2, "q_targets": heads2.targets})
    run2.logger.close()
    assert run2.step == 4
    for k, v in heads.state_dict().items():      # online (a part) and targets (an object) alike
        assert torch.equal(v, heads2.state_dict()[k]), k
    a, b = buffer.state_dict(), buffer2.state_dict()
    assert (a["pos"], a["size"]) == (b["pos"], b["size"]) == (2, 5)
    assert all(torch.equal(a["data"][n], b["data"][n]) for n in a["data"])
    with pytest.raises(UsageError, match="has no 'cache'"):
        load_checkpoint(checkpoints(tmp_path)[-1][1], {}, objects={"cache": buffer2})
