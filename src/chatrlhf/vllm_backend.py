"""vLLM as the training rollout's sampler, on a GPU (``--rollout-engine vllm``; ``pip install 'chatrlhf[vllm]'``).

Generation is most of an RL step's time; on a GPU vLLM samples several times faster than any loop over
``model.forward``. The backend answers the one call the trainers make of the engine, ``sample_tensors`` (the
training rollout as tensors), so nothing else changes. Colocated, as TRL's ``vllm_mode="colocate"``: vLLM runs in the
training process on the same GPU with a share of its memory (``--vllm-gpu-memory``), asleep (weights offloaded, KV cache
freed) while the policy trains, awake while it samples.

Three things make it correct:
  * **weights**: after every update the policy's weights are pushed to vLLM before it samples again
    (:func:`sampler_weights`: with LoRA the adapters merged into the base weights, under the base model's names);
  * **seeds**: each row's reply is drawn with a seed of its own, taken from the row's generator, so a resumed run
    samples as the uninterrupted one;
  * **the mismatch**: vLLM's kernels give slightly different log-probs than the trainer's forward pass, so the replies
    are a little off-policy. PPO weighs each token's loss by the truncated importance ratio
    min(π_train(a|s) / π_vLLM(a|s), C) (losses.truncated_importance_weights; Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training") and logs the ratio's mean and the share truncated.

On a machine without CUDA the backend is refused before anything loads (:func:`check_available`). The weight push and
the packing of vLLM's outputs are tested with a stand-in for ``vllm.LLM`` (tests/test_vllm_backend.py); on a GPU,
benchmarks/gpu/ runs it.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

import torch

from chatrlhf.engine import SamplingParams
from chatrlhf.errors import UsageError


def check_available(device: torch.device) -> None:
    """Refuse the vLLM backend where it cannot run: no CUDA device, or vllm not installed."""
    if device.type != "cuda":
        raise UsageError(f"--rollout-engine vllm: vLLM samples on a CUDA GPU and this run is on {device.type}",
                         "use --rollout-engine local (our engine: CPU or GPU)")
    if find_spec("vllm") is None:
        raise UsageError("--rollout-engine vllm: the vllm package is not installed",
                         "pip install 'chatrlhf[vllm]' (a CUDA machine), or use --rollout-engine local")


def sampler_weights(model) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight the sampler needs, under the plain Hugging Face model's names: LoRA adapters
    (peft) merged in — W + ΔW, computed here without touching the trained model — and the adapter matrices left out.
    ``model``: the causal LM, with or without its peft wrapper (a value head is not part of it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach()
            merged[f"{name}.weight"] = weight
    out = []
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        out.append((plain, merged.get(plain, value.detach())))
    return out


class VLLMSampler:
    """``Engine.sample_tensors`` on a colocated ``vllm.LLM`` (``llm`` and its ``params_class``, vllm.SamplingParams:
    given — a stand-in in tests — or built from ``model_dir``)."""

    def __init__(self, tok, model_dir: str | None = None, dtype: str = "auto", gpu_memory: float = 0.3,
                 max_model_len: int = 2048, llm=None, params_class=None):
        self.tok = tok
        if llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: weights pushable
            from vllm import LLM, SamplingParams as VParams  # optional extra, GPU only: imported where it is used

            llm = LLM(model=model_dir, dtype="bfloat16" if dtype == "auto" else dtype, gpu_memory_utilization=gpu_memory,
                      max_model_len=max_model_len, enable_sleep_mode=True, enable_prefix_caching=True)
            params_class = VParams
        self.llm, self.params_class, self.asleep, self.pushed = llm, params_class, False, 0

    def push(self, model) -> None:
        """The policy's current weights into vLLM (after each update, before sampling again), then reset its prefix
        cache: cached K/V of the old weights would be wrong."""
        self.wake()
        weights = sampler_weights(model)
        self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()
        self.pushed += 1

    def sleep(self) -> None:
        """Free the GPU for training: weights to CPU, KV cache dropped (vLLM sleep level 1)."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sample_tensors(self, query_ids: torch.Tensor, query_mask: torch.Tensor, params: SamplingParams,
                       generator: torch.Generator | None = None, row_generators: list[torch.Generator] | None = None):
        """As :meth:`chatrlhf.engine.Engine.sample_tensors`: (response_ids, response_mask, logprobs), (B, R =
        params.max_tokens), right-padded after the first EOS; each row's seed drawn from its generator (or from
        ``generator``), so a run samples the same replies again."""
        self.wake()
        rows = row_generators or [generator] * len(query_ids)
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(query_ids, query_mask)]
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in rows]
        sampling = [self.params_class(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                            max_tokens=params.max_tokens, logprobs=0, seed=s, stop_token_ids=[self.tok.eos_token_id])
                    for s in seeds]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        self.sleep()
        return pack_outputs(outputs, params.max_tokens, self.tok.pad_token_id, query_ids.device)


def pack_outputs(outputs, max_tokens: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's RequestOutputs as (response_ids, response_mask, logprobs), (B, max_tokens): the sampled token's
    log-prob at each position (vLLM's ``logprobs=0`` gives exactly that token's), 0 and PAD after the reply."""
    B = len(outputs)
    ids = torch.full((B, max_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((B, max_tokens), dtype=torch.long)
    lp = torch.zeros((B, max_tokens))
    for i, out in enumerate(outputs):
        c = out.outputs[0]
        tokens = list(c.token_ids)[:max_tokens]
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lp[i, :len(tokens)] = torch.tensor([float(step[t].logprob) for t, step in zip(tokens, c.logprobs)])
        mask[i, :len(tokens)] = 1
    return ids.to(device), mask.to(device), lp.to(device)
