"""Integration: the embedded SmolLM2-135M-Instruct, end to end through the real CLI."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf.logger import read_metrics
from conftest import EXAMPLES, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sft_on_the_embedded_model_lowers_held_out_loss(tmp_path):
    out = tmp_path / "sft"
    r = run_cli("sft", "--model", "smollm2-135m", "--data", EXAMPLES / "dialogue_history.csv", "--max-steps", "6",
                "--batch-size", "4", "--lr", "5e-5", "--warmup-ratio", "0", "--eval-steps", "1000",
                "--output-dir", out, "--quiet", "--no-tensorboard", "--config", EXAMPLES / "sft.yaml")
    assert r.returncode == 0, r.stderr
    evals = [m["eval/loss"] for m in read_metrics(out) if "eval/loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05, evals
    summary = json.loads((out / "chatrlhf.json").read_text())
    assert summary["config"]["max_steps"] == 6 and summary["config"]["save_steps"] == 10   # flag beat YAML; YAML beat default
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id != tok.eos_token_id and "<|im_start|>" in tok.chat_template
    assert model.config.num_hidden_layers == 30
