import json

from chatrlhf.cli import parser
from chatrlhf.config import GenerateConfig, ModelArgs, build_config
from chatrlhf.engine import Engine
from chatrlhf.generation import sampling_params
from chatrlhf.models import load_model
from conftest import EXAMPLES, run_cli


def test_deployment_defaults_are_the_seeds():
    cfg = build_config(GenerateConfig, parser().parse_args(["generate"]))
    assert (cfg.temperature, cfg.top_k, cfg.repetition_penalty, cfg.sample) == (0.7, 100, 1.2, True)
    model, tok = load_model(ModelArgs(model="tiny-random-llama"))
    p = sampling_params(cfg)   # the engine's parameters (decoding_kwargs for model.generate before the engine)
    assert p.temperature > 0 and p.temperature == 0.7 and p.top_k == 100 and p.repetition_penalty == 1.2
    engine = Engine(model, tok)
    assert engine.pad_id == tok.pad_token_id != engine.eos_id


def test_left_padded_batch_gives_each_prompt_its_own_logits():
    # left padding needs position ids from the attention mask; wrong ones shift every logit
    import torch

    from chatrlhf.data.template import render

    model, tok = load_model(ModelArgs(model="tiny-random-llama"))
    model.eval()
    tok.padding_side = "left"
    texts = [render(tok, [{"role": "user", "content": c}], add_generation_prompt=True)
             for c in ("Hi", "Where is my order? It was due on Monday and nothing came.")]

    def first_logits(batch):
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        return out.logits[0]

    batched = first_logits(texts)
    for i, t in enumerate(texts):
        assert torch.allclose(batched[i], first_logits([t])[0], atol=1e-4)


def test_generate_cli_writes_one_reply_per_prompt(tmp_path):
    out = tmp_path / "replies.jsonl"
    r = run_cli("generate", "--model", "tiny-random-gpt2", "--prompts", EXAMPLES / "prompts.txt", "--out", out,
                "--max-new-tokens", "6", "--batch-size", "3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    n_prompts = len([x for x in (EXAMPLES / "prompts.txt").read_text().splitlines() if x.strip()])
    assert len(rows) == n_prompts
    assert rows[0]["prompt"] == [{"role": "user", "content": "Where is my order?"}]
    assert all(isinstance(x["response"], str) for x in rows)


def test_generate_cli_takes_a_dialogue_file_as_prompts(tmp_path):
    out = tmp_path / "r.jsonl"
    r = run_cli("generate", "--model", "tiny-random-llama", "--prompts", EXAMPLES / "dialogue_history.csv",
                "--out", out, "--max-new-tokens", "2", "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[1]["prompt"][-1]["role"] == "user" and len(rows[1]["prompt"]) == 3  # history without the reply


def test_generate_cli_needs_files():
    r = run_cli("generate", "--model", "tiny-random-gpt2")
    assert r.returncode == 2 and "--prompts" in r.stderr


def test_chat_is_multi_turn():
    r = run_cli("chat", "--model", "tiny-random-llama", "--max-new-tokens", "4",
                input="Hello\nWhere is my order?\n/reset\nHi again\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 3 and "(conversation cleared)" in r.stdout


def test_data_inspect_cli(tmp_path):
    r = run_cli("data", "inspect", EXAMPLES / "dialogue_history.csv", "--model", "tiny-random-llama")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout[: r.stdout.rindex("}") + 1])
    assert report["format"] == "dialogue_csv" and report["records"] >= 36
    assert report["tokens"]["min"] <= report["tokens"]["p50"] <= report["tokens"]["max"]
    bad = tmp_path / "bad.csv"
    bad.write_text('history,responses\n"User: a",\n"User: b",ok\n"User: c\nAssistant: d",e\n')
    r = run_cli("data", "inspect", bad, "--model", "tiny-random-llama", "--max-length", "8")
    assert r.returncode == 0
    assert "3 problem(s)" in r.stdout or "problem(s)" in r.stdout
    assert f"{bad}:2: field 'responses': empty reply" in r.stdout
    assert f"{bad}:4: field 'history': ends with an assistant turn" in r.stdout
    assert f"{bad}:3: conversation is" in r.stdout and "> --max-length 8" in r.stdout
