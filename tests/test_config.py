import pytest

from chatrlhf.cli import COMMANDS, parser
from chatrlhf.config import SFTConfig, build_config
from chatrlhf.errors import UsageError


def cfg_from(argv, yaml=None):
    ns = parser().parse_args(argv)
    return build_config(SFTConfig, ns, yaml)


def test_defaults_and_flags():
    cfg = cfg_from(["sft", "--max-steps", "7", "--lr", "0.001", "--no-tensorboard"])
    assert cfg.max_steps == 7 and cfg.lr == 0.001 and cfg.tensorboard is False
    assert cfg.model == "smollm2-135m" and cfg.output_dir == "out/sft" and cfg.seed == 0


def test_flags_beat_yaml_and_yaml_beats_defaults(write):
    y = write("run.yaml", "max_steps: 3\nlr: 1e-4\nbatch-size: 2\nmodel: tiny-random-gpt2\n")
    cfg = cfg_from(["sft", "--max-steps", "9", "--config", str(y)], str(y))
    assert cfg.max_steps == 9          # flag wins
    assert cfg.lr == 1e-4 and cfg.batch_size == 2 and cfg.model == "tiny-random-gpt2"  # from YAML


def test_yaml_unknown_key_names_key_and_file(write):
    y = write("run.yaml", "max_stepz: 3\n")
    with pytest.raises(UsageError, match=r"run.yaml: unknown key 'max_stepz'"):
        cfg_from(["sft"], str(y))


def test_yaml_wrong_type_and_choice(write):
    with pytest.raises(UsageError, match="key 'max_steps' must be int"):
        cfg_from(["sft"], str(write("a.yaml", "max_steps: lots\n")))
    with pytest.raises(UsageError, match="key 'dtype' must be one of"):
        cfg_from(["sft"], str(write("b.yaml", "dtype: fp8\n")))


def test_bad_yaml_names_line(write):
    with pytest.raises(UsageError, match=r"c.yaml:2: invalid YAML"):
        cfg_from(["sft"], str(write("c.yaml", "lr: 1\n  - : [\n")))


def test_a_setting_decided_at_run_time_is_none_until_given(write):
    from chatrlhf.config import PPOConfig

    assert build_config(PPOConfig, parser().parse_args(["ppo"])).missing_eos_penalty is None
    assert build_config(PPOConfig, parser().parse_args(["ppo", "--missing-eos-penalty", "2"])).missing_eos_penalty == 2.0
    assert build_config(PPOConfig, {}, str(write("n.yaml", "missing_eos_penalty: null\n"))).missing_eos_penalty is None
    assert build_config(PPOConfig, {}, str(write("v.yaml", "missing_eos_penalty: 0\n"))).missing_eos_penalty == 0.0
    with pytest.raises(UsageError, match="key 'missing_eos_penalty' must be float"):
        build_config(PPOConfig, {}, str(write("w.yaml", "missing_eos_penalty: lots\n")))
    with pytest.raises(SystemExit):
        parser().parse_args(["ppo", "--missing-eos-penalty", "lots"])


@pytest.mark.parametrize("command", ["dpo", "kto", "ppo", "grpo", "reward train"])
def test_a_negative_wall_clock_budget_is_refused(command):
    ns = parser().parse_args([*command.split(), "--max-minutes", "-1"])
    with pytest.raises(UsageError, match="--max-minutes -1: a budget cannot be negative"):
        build_config(COMMANDS[command], ns)
    assert build_config(COMMANDS[command], parser().parse_args([*command.split(), "--max-minutes", "0.5"])).max_minutes == 0.5
