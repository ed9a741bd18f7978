"""The CLI as a whole: every --help prints, every boolean flag works both ways, and every flag a command lists is
read by that command (so a flag that silently does nothing cannot come back)."""

import argparse
import dataclasses
import io
import json
import typing

import pytest
from fastapi.testclient import TestClient

from chatrlhf import cli
from chatrlhf.config import add_dataclass_args, arg, build_config, config_dict
from chatrlhf.feedback.app import create_app
from chatrlhf.feedback.store import Store
from chatrlhf.logger import read_metrics
from conftest import EXAMPLES

FEEDBACK_FILES = [EXAMPLES / f for f in ("preferences.jsonl", "ratings.jsonl", "corrections.jsonl")]


def leaf_commands(parser=None, path=()):
    """Every command path of the real parser, found by walking its sub-parsers (no hand-kept list)."""
    parser = parser or cli.parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for name, p in subs[0].choices.items() for leaf in leaf_commands(p, path + (name,))]


LEAVES = leaf_commands()


def test_the_walk_finds_every_command():
    assert {" ".join(p) for p in LEAVES} == set(cli.COMMANDS)
    assert ("reward", "train") in LEAVES and ("feedback", "serve") in LEAVES and ("sft",) in LEAVES


@pytest.mark.parametrize("path", [()] + [p[:1] for p in LEAVES if len(p) > 1] + LEAVES, ids=" ".join)
def test_every_help_prints_and_exits_0(path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chatrlhf") and "RL_DETAILS" not in out


def bool_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is bool]


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_boolean_flag_works_both_ways(name):
    cls = cli.COMMANDS[name]
    for field in bool_fields(cls):
        flag = "--" + field.replace("_", "-")
        for argv, want in (([flag], True), ([flag.replace("--", "--no-", 1)], False)):
            ns = cli.parser().parse_args([*name.split(), *argv])
            assert getattr(build_config(cls, ns), field) is want, (name, argv)


def test_chat_template_off_is_recorded_as_off():
    ns = cli.parser().parse_args(["ppo", "--no-chat-template"])
    assert config_dict(build_config(cli.COMMANDS["ppo"], ns))["chat_template"] is False
    ns = cli.parser().parse_args(["generate", "--no-sample"])
    assert build_config(cli.COMMANDS["generate"], ns).sample is False


def test_a_bool_field_named_no_something_is_refused():
    @dataclasses.dataclass
    class Bad:
        no_thing: bool = arg(False, "would be inverted by argparse")

    with pytest.raises(TypeError, match="name a bool field for what it turns on"):
        add_dataclass_args(argparse.ArgumentParser(), Bad)


def test_lists_and_maps_from_flags_and_yaml(write):
    ns = cli.parser().parse_args(["reward", "train", "--data", "a.jsonl, b.jsonl", "--source-weights", "rating=0.5"])
    cfg = build_config(cli.COMMANDS["reward train"], ns)
    assert cfg.data == ["a.jsonl", "b.jsonl"] and cfg.source_weights == {"rating": 0.5}
    cfg = build_config(cli.COMMANDS["reward train"], cli.parser().parse_args(["reward", "train"]),
                       str(write("r2.yaml", "data: [x.jsonl, y.jsonl]\nsource_weights: {preference: 2}\n")))
    assert cfg.data == ["x.jsonl", "y.jsonl"] and cfg.source_weights == {"preference": 2.0}
    cfg = build_config(cli.COMMANDS["ppo"], cli.parser().parse_args(["ppo"]), str(write("p.yaml", "reward_weights: "
                                                                                        "{rm: 1, human: 'cosine:1:0:5'}\n")))
    assert cfg.reward_weights == {"rm": "1", "human": "cosine:1:0:5"}


def test_old_no_key_in_yaml_says_what_to_write(write):
    from chatrlhf.errors import UsageError

    with pytest.raises(UsageError, match="write 'chat_template: false'"):
        build_config(cli.COMMANDS["sft"], {}, str(write("o.yaml", "no_chat_template: true\n")))


# --------------------------------------------------------------------------- every flag is read


def recording(cfg):
    """A copy of ``cfg`` that records which of its fields are read."""
    names = {f.name for f in dataclasses.fields(cfg)}
    read: set[str] = set()

    class Recording(type(cfg)):
        def __getattribute__(self, attr):
            if attr in names:
                read.add(attr)
            return object.__getattribute__(self, attr)

    return Recording(**config_dict(cfg)), read


TINY = ["--model", "tiny-random-llama"]
RUN = ["--quiet", "--no-tensorboard"]
REWARD_FN = "def polite(prompts, responses):\n    return [float('thank' in r.lower()) for r in responses]\n"


def keys_file(t):
    path = t / "api-keys"
    path.write_text("a-key-of-sixteen-or-more\n")
    return path


def bias_terms(t):
    path = t / "bias-terms.yaml"
    path.write_text("dimensions:\n  pet:\n    slot: person\n    groups:\n      cat: [cat owner]\n      dog: [dog owner]\n")
    return path


def cover(t, fn, rm, feedback_db):
    """{command: [argv, …]}: runs that together take every path on which a flag is read."""
    dialogues = EXAMPLES / "dialogue_history.csv"
    prompts = t / "prompts.txt"
    prompts.write_text("Where is my order?\nDo you ship to Canada?\nHow do I reset my password?\n")
    ppo = [*TINY, *RUN, "--data", dialogues, "--max-new-tokens", "4", "--batch-size", "2", "--minibatch-size", "2",
           "--max-steps", "2", "--ppo-epochs", "1", "--reward-fn", fn, "--eval-steps", "1", "--save-steps", "1",
           "--sample-rows", "1"]
    grpo = [*TINY, *RUN, "--data", dialogues, "--max-new-tokens", "4", "--batch-size", "2", "--num-generations", "2",
            "--micro-batch-size", "2", "--max-steps", "2", "--reward-fn", fn, "--eval-steps", "1", "--save-steps", "1",
            "--sample-rows", "1"]
    return {
        "sft": [[*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "s1", "--lora-r", "2", "--eval-data", dialogues,
                 "--no-chat-template", "--max-length", "64", "--overlong", "drop", "--log-steps", "1", "--eval-steps", "1"],
                [*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "s2"]],
        "reward train": [[*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "r1", "--data", FEEDBACK_FILES[0],
                          "--eval-data", FEEDBACK_FILES[1], "--norm-data", EXAMPLES / "ratings.jsonl", "--lora-r", "2",
                          "--lora-alpha", "4", "--lora-dropout", "0.1"],
                         [*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "r2"],
                         [*TINY, *RUN, "--output-dir", t / "r3", "--data", FEEDBACK_FILES[0], "--freeze-trunk",
                          "--ensemble", "2", "--layer", "1", "--pooling", "both", "--head-dropout", "0.1",
                          "--label-smoothing", "0.1", "--epochs", "2", "--patience", "1", "--average-checkpoints", "2",
                          "--no-calibrate"]],
        "ppo": [[*ppo, "--output-dir", t / "p1", "--lora-r", "2", "--critic", "shared", "--adaptive-kl", "--eval-data",
                 prompts, "--reward-model", rm, "--force", "--human-feedback", FEEDBACK_FILES[1], "--references",
                 dialogues, "--reward-weights", "fn=1", "--no-chat-template"],
                [*ppo, "--output-dir", t / "p2", "--critic", "policy", "--whiten-rewards"],
                [*ppo, "--output-dir", t / "p3", "--env", "dialogue", "--turn-gamma", "0.5", "--max-turns", "1",
                 "--critic", "shared", "--samples-per-prompt", "1"]],
        "grpo": [[*grpo, "--output-dir", t / "g1", "--lora-r", "2", "--eval-data", prompts, "--reward-model", rm, "--force",
                  "--human-feedback", FEEDBACK_FILES[1], "--references", dialogues, "--reward-weights", "fn=1",
                  "--no-chat-template", "--num-iterations", "2", "--minibatch-size", "2", "--epsilon", "0.2",
                  "--epsilon-high", "0.28", "--loss-type", "dr_grpo", "--max-minutes", "10"],
                 [*grpo, "--output-dir", t / "g2", "--advantage", "rloo", "--kl-in-reward", "--scale-rewards",
                  "--beta", "0.1"]],
        "dpo": [[*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "d1", "--data", FEEDBACK_FILES[2], "--eval-data",
                 FEEDBACK_FILES[0], "--lora-r", "2", "--no-chat-template", "--max-length", "64", "--beta", "0.2",
                 "--loss-type", "sigmoid", "--label-smoothing", "0.1", "--rpo-alpha", "0.5", "--eval-steps", "1",
                 "--source-weights", "correction=2", "--ties", "drop", "--both-bad", "drop", "--max-minutes", "10"],
                [*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "d2", "--data", FEEDBACK_FILES[2]]],
        "kto": [[*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "k1", "--data", FEEDBACK_FILES[2], "--eval-data",
                 FEEDBACK_FILES[0], "--lora-r", "2", "--no-chat-template", "--max-length", "64", "--beta", "0.2",
                 "--desirable-weight", "1.2", "--undesirable-weight", "1", "--eval-steps", "1", "--max-minutes", "10"],
                [*TINY, *RUN, "--max-steps", "1", "--output-dir", t / "k2", "--data", FEEDBACK_FILES[2]]],
        "bestofn": [[*TINY, *RUN, "--data", prompts, "--output-dir", t / "b1", "--reward-fn", fn, "--num-samples", "2",
                     "--batch-size", "2", "--max-new-tokens", "4", "--max-prompt-length", "64", "--sft", "--rounds", "2",
                     "--lora-r", "2", "--lora-alpha", "4", "--lora-dropout", "0", "--lr", "1e-4", "--epochs", "1",
                     "--sft-batch-size", "2", "--max-length", "64", "--seed", "1", "--save-steps", "2",
                     "--temperature", "0.9", "--top-p", "0.9"],
                    [*TINY, *RUN, "--data", dialogues, "--format", "dialogue_csv", "--output-dir", t / "b2", "--reward-fn",
                     fn, "--reward-model", rm, "--force", "--human-feedback", FEEDBACK_FILES[1], "--references", dialogues,
                     "--reward-weights", "fn=1", "--no-reward-norm", "--no-chat-template", "--num-samples", "2",
                     "--batch-size", "16", "--max-new-tokens", "3", "--keep", "threshold", "--threshold", "-100",
                     "--min-gap", "0.01", "--missing-eos-penalty", "0.5", "--dtype", "float32", "--device", "cpu"]],
        "qlearn": [[*TINY, *RUN, "--data", dialogues, "--output-dir", t / "q1", "--max-steps", "2", "--max-new-tokens", "4",
                    "--eval-data", dialogues, "--eval-dialogues", "1", "--eval-steps", "1", "--save-steps", "1",
                    "--reward-model", rm, "--force", "--human-feedback", FEEDBACK_FILES[1], "--references", dialogues,
                    "--reward-fn", fn, "--reward-weights", "fn=1", "--q-model", "tiny-random-llama", "--pooling", "mean",
                    "--candidates", "2", "--max-turns", "1", "--user-model", "tiny-random-gpt2", "--learning-starts", "1",
                    "--batch-size", "2", "--updates-per-step", "2", "--cql-alpha", "0.1", "--heads", "3", "--hidden", "8",
                    "--solver", "dqn", "--human-candidate", "--features", "both", "--phi-norm"],
                   [*TINY, *RUN, "--data", dialogues, "--output-dir", t / "q2", "--max-steps", "1", "--max-new-tokens", "4",
                    "--eval-dialogues", "1", "--references", dialogues, "--candidates", "1"]],
        "qlearn-offline": [[*TINY, *RUN, "--data", f"{dialogues},{FEEDBACK_FILES[2]}", "--eval-data", FEEDBACK_FILES[1],
                            "--output-dir", t / "qo1", "--max-steps", "2", "--max-new-tokens", "4", "--eval-steps", "1",
                            "--save-steps", "1", "--reward-model", rm, "--force", "--human-feedback", FEEDBACK_FILES[1],
                            "--references", dialogues, "--reward-fn", fn, "--reward-weights", "fn=1", "--q-model",
                            "tiny-random-llama", "--pooling", "mean", "--candidates", "2", "--cql-alpha", "0.1",
                            "--heads", "3", "--hidden", "8", "--batch-size", "4", "--gamma", "0.5", "--expectile", "0.8"],
                           [*TINY, *RUN, "--data", FEEDBACK_FILES[1], "--output-dir", t / "qo2", "--max-steps", "1",
                            "--hidden", "8"]],
        "eval": [[*TINY, "--baseline", "tiny-random-llama", "--reward-model", rm, "--run", t / "p2", "--max-prompts", "2",
                  "--max-new-tokens", "3", "--output-dir", t / "e", "--embedding", "--bias", "--bias-dimensions", "age",
                  "--bias-max-sets", "1"],
                 [*TINY, "--bias-only", "--bias-terms", bias_terms(t), "--bias-dimensions", "pet", "--bias-threshold",
                  "0.5", "--reward-fn", fn, "--max-new-tokens", "2", "--output-dir", t / "e2"]],
        "chat": [[*TINY, "--max-new-tokens", "3", "--rerank", f"q:{t / 'q1'}", "--candidates", "2"]],
        "generate": [[*TINY, "--prompts", prompts, "--out", t / "g.jsonl", "--max-new-tokens", "3", "--rerank",
                      f"rm:{rm}", "--candidates", "2"]],
        "serve": [[*TINY, "--max-new-tokens", "3", "--temperature", "0.5", "--top-k", "5", "--top-p", "0.9",
                   "--repetition-penalty", "1.1", "--no-chat-template", "--dtype", "float32", "--device", "cpu",
                   "--host", "127.0.0.1", "--port", "8001", "--model-name", "tiny", "--api-key", "k" * 16,
                   "--api-keys", keys_file(t), "--max-batch", "2", "--max-queue", "1", "--max-concurrent", "1",
                   "--max-prompt-tokens", "64", "--max-tokens-limit", "8", "--max-n", "2", "--max-body-bytes", "4096",
                   "--feedback-db", t / "served.db", "--redact", "--admin-key", "admin-key-of-16-chars",
                   "--rerank", f"rm:{rm}", "--candidates", "2"]],
        "reward eval": [[*TINY, "--model", rm, "--data", FEEDBACK_FILES[0]]],
        "reward score": [["--model", rm, "--data", t / "g.jsonl", "--out", t / "scored.jsonl"]],
        "feedback init": [["--db", feedback_db]],
        "feedback add-user": [["--db", feedback_db, "--name", "boss", "--role", "admin"]],
        "feedback import": [["--db", feedback_db, "--data", FEEDBACK_FILES[0], "--k", "2"]],
        "feedback export": [["--db", feedback_db, "--output-dir", t / "fx"]],
        "feedback stats": [["--db", feedback_db]],
        "feedback serve": [["--db", feedback_db, "--model", "tiny-random-llama"]],
        "feedback queue": [["--db", feedback_db, "--strategy", "disagreement", "--count", "3", "--kind", "rate",
                            "--reward-model", t / "r3", "--k", "2", "--round", "1", "--seed", "1"]],
        "feedback simulate": [["--url", "http://feedback.test", "--user", "boss", "--oracle", fn, "--noise", "0.1",
                               "--limit", "2", "--seed", "1"]],
        "data inspect": [[dialogues, *TINY]],
        # the store has items but no answers yet: the round reads every setting, finds no new feedback and stops
        "loop": [["--work-dir", t / "loop", "--db", feedback_db, "--model", "tiny-random-llama", "--rounds", "2",
                  "--no-resume", "--rule", "majority", "--reward-start", "continue", "--human-weight", "linear:1:0.2:5",
                  "--checks", "win_rate,kl", "--min-win-lower", "0.4", "--max-kl", "5", "--reward",
                  "model=tiny-random-llama,max_steps=1", "--policy", "method=bestofn,num_samples=2", "--eval",
                  "max_prompts=2", "--serve", "url=http://127.0.0.1:9,admin_key_env=LOOP_KEY", "--queue",
                  "strategy=uncertainty,count=2"]],
    }


ORDER = ["reward train", "ppo", "grpo", "dpo", "kto", "bestofn", "qlearn", "qlearn-offline", "sft", "eval", "chat", "generate", "serve", "reward eval", "reward score", "feedback init",
         "feedback add-user", "feedback import", "feedback export", "feedback stats", "feedback serve", "loop",
         "feedback queue", "feedback simulate", "data inspect"]


@pytest.mark.slow
def test_every_flag_of_every_command_is_read(tmp_path, write, monkeypatch, capsys):
    import uvicorn

    fn = f"{write('rew.py', REWARD_FN)}:polite"
    rm = tmp_path / "r2"  # trained by the second `reward train` run, used by the later commands
    table = cover(tmp_path, fn, rm, str(tmp_path / "fb.db"))
    assert set(table) == set(cli.COMMANDS) == set(ORDER)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr("chatrlhf.cli.active.client", lambda url: TestClient(create_app(Store(str(tmp_path / "fb.db"))),
                                                                             base_url=url))
    monkeypatch.setenv("CHATRLHF_PASSWORD", "a long enough password")
    unread = {}
    for name in ORDER:
        read: set[str] = set()
        for argv in table[name]:
            ns = cli.parser().parse_args([*name.split(), *map(str, argv)])
            cfg, seen = recording(build_config(cli.COMMANDS[name], ns, ns.config))
            monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
            assert cli.dispatch(name, cfg) == 0, (name, argv, capsys.readouterr())
            read |= seen
        unread[name] = sorted({f.name for f in dataclasses.fields(cli.COMMANDS[name])} - read)
    assert all(not v for v in unread.values()), {k: v for k, v in unread.items() if v}
    for saved in (json.loads((tmp_path / "p1" / "run_config.json").read_text()),
                  json.loads((tmp_path / "p1" / "chatrlhf.json").read_text())["config"]):
        assert saved["chat_template"] is False and saved["lora_r"] == 2 and saved["critic"] == "shared"
        assert saved["eval_data"] == [str(tmp_path / "prompts.txt")] and saved["reward_weights"] == {"fn": "1"}
    first_eval = next(m for m in read_metrics(tmp_path / "p1") if "eval/reward" in m)
    assert first_eval["eval/length"] > 0 and " / 3 held-out prompts" in capsys.readouterr().out
