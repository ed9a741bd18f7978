"""The `chatrlhf` command: one sub-command per stage; the flags of each are the fields of its config
dataclass (see config.py). The parser, ``main`` and the one ``dispatch`` live here; each command group runs in
its own module (train.py: sft, ppo, grpo, dpo, kto, bestofn, qlearn, qlearn-offline; reward.py; feedback.py; data.py; eval.py; generate.py: chat, generate; serve.py; loop.py). The
one place that wires stages together: nothing imports ``chatrlhf.cli``."""

from __future__ import annotations

import argparse
import gc
import os
import sys

from chatrlhf import __version__
from chatrlhf.config import BestOfNConfig, ChatConfig, DPOConfig, EvalConfig, FeedbackExportConfig, FeedbackImportConfig, FeedbackInitConfig, \
    FeedbackQueueConfig, FeedbackServeConfig, FeedbackSimulateConfig, FeedbackStatsConfig, FeedbackUserConfig, GenerateConfig, GRPOConfig, InspectConfig, KTOConfig, LoopConfig, PPOConfig, QLearnConfig, QOfflineConfig, RewardEvalConfig, \
    RewardScoreConfig, RewardTrainConfig, ServeConfig, SFTConfig, add_dataclass_args, build_config
from chatrlhf.errors import ChatRLHFError

COMMANDS = {"sft": SFTConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "dpo": DPOConfig, "kto": KTOConfig, "bestofn": BestOfNConfig, "qlearn": QLearnConfig, "qlearn-offline": QOfflineConfig, "eval": EvalConfig, "chat": ChatConfig, "generate": GenerateConfig,
            "serve": ServeConfig, "loop": LoopConfig,
            "reward train": RewardTrainConfig, "reward eval": RewardEvalConfig, "reward score": RewardScoreConfig,
            "feedback init": FeedbackInitConfig, "feedback add-user": FeedbackUserConfig,
            "feedback import": FeedbackImportConfig, "feedback export": FeedbackExportConfig,
            "feedback stats": FeedbackStatsConfig, "feedback serve": FeedbackServeConfig,
            "feedback queue": FeedbackQueueConfig, "feedback simulate": FeedbackSimulateConfig,
            "data inspect": InspectConfig}
GROUPS = {"reward": "Train, evaluate and use a reward model.",
          "feedback": "The human feedback store: users, items, export.",
          "data": "Look at data files."}
POSITIONAL = {"data inspect": ("file",)}


def _summary(cls) -> str:
    return " ".join(cls.__doc__.split(":", 1)[1].split())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatrlhf", description="Make a chat model better with human feedback.")
    p.add_argument("--version", action="version", version=f"chatrlhf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, cls in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if not tail:
            target = sub.add_parser(name, help=_summary(cls), description=cls.__doc__)
        else:
            if head not in groups:
                groups[head] = sub.add_parser(head, help=GROUPS[head]).add_subparsers(
                    dest="subcommand", required=True, metavar="SUBCOMMAND")
            target = groups[head].add_parser(tail, help=_summary(cls), description=cls.__doc__)
        add_dataclass_args(target, cls, positional=POSITIONAL.get(name, ()))
    return p


def command_name(ns: argparse.Namespace) -> str:
    return f"{ns.command} {ns.subcommand}" if getattr(ns, "subcommand", None) else ns.command


def main(argv: list[str] | None = None) -> int:
    """The `chatrlhf` command; returns its exit status. One process of several (a rank) ends here instead, without
    the interpreter's teardown (see :func:`_end_rank`)."""
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _end_rank(code)
    return code


def _end_rank(code: int) -> None:
    """Exit a rank with ``code`` once its run is over (files closed, the process group left by :func:`dispatch`),
    skipping the interpreter's teardown: the C++ objects of a finished gloo run (pending work of FSDP's asynchronous
    collectives, the store's threads) destroyed at shutdown sometimes aborted a rank that had finished cleanly
    ("terminate called without an active exception"), failing the whole run."""
    gc.collect()  # file objects nobody holds any more are flushed and closed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = parser().parse_args(argv)
    name = command_name(ns)
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — one process of several: the main rank speaks
    try:
        cfg = build_config(COMMANDS[name], ns, ns.config)
        if getattr(cfg, "num_processes", 1) > 1 and "WORLD_SIZE" not in os.environ:
            from chatrlhf.cli.launch import relaunch  # torch: only when a command runs (see command_module)

            return relaunch(sys.argv[1:] if argv is None else argv, cfg.num_processes)
        return dispatch(name, cfg)
    except ChatRLHFError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank meets the same bad input: one says so
            print(f"chatrlhf {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatrlhf {name}: interrupted", file=sys.stderr)
        return 130


def dispatch(name: str, cfg) -> int:
    """Run command ``name`` (e.g. ``"reward train"``) with its config: the one place a command reaches its code."""
    head, _, sub = name.partition(" ")
    if head not in ("data", "feedback"):
        _threads()
    try:
        code = command_module(head).run(sub or head, cfg)
    except BaseException:
        _leave_processes(together=False)  # the others may be stuck in a collective: no barrier
        raise
    _leave_processes(together=True)
    return code


def _leave_processes(together: bool) -> None:
    """One process of several: leave the process group before the interpreter exits — a gloo group left to the
    interpreter's shutdown can abort it ("terminate called without an active exception") after a finished run."""
    dist = sys.modules.get("torch.distributed")  # imported only if a command ran in several processes
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    ds = sys.modules.get("deepspeed.comm")  # DeepSpeed keeps references to the groups: it lets them go too
    if together:
        dist.barrier()  # every rank is done with the group (and with rank 0's store) before any leaves
    if ds is not None and getattr(ds, "cdb", None) is not None:
        ds.destroy_process_group()
    else:
        dist.destroy_process_group()


def command_module(head: str):
    """The module of command group ``head``, imported only when one of its commands runs: `chatrlhf --help` and
    `chatrlhf feedback …` never import torch (see tests/test_layout.py, LAZY)."""
    if head in ("sft", "ppo", "grpo", "dpo", "kto", "bestofn", "qlearn", "qlearn-offline"):
        from chatrlhf.cli import train as module
    elif head in ("chat", "generate"):
        from chatrlhf.cli import generate as module
    elif head == "serve":
        from chatrlhf.cli import serve as module
    elif head == "loop":
        from chatrlhf.cli import loop as module
    elif head == "eval":
        from chatrlhf.cli import eval as module
    elif head == "reward":
        from chatrlhf.cli import reward as module
    elif head == "feedback":
        from chatrlhf.cli import feedback as module
    elif head == "data":
        from chatrlhf.cli import data as module
    else:
        raise KeyError(head)
    return module


def _threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
