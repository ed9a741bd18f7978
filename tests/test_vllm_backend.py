"""The vLLM rollout backend without a GPU: a stand-in for ``vllm.LLM`` that keeps its own copy of the model, takes
pushed weights as vLLM's ``load_weights`` does and samples with our engine — so the weight push, the sampler's
interface, the importance weights and their place in PPO are tested here; vLLM itself runs in benchmarks/gpu/."""

import copy
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from chatrlhf import losses
from chatrlhf.config import LoraArgs, ModelArgs, PPOConfig
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.models import load_model
from chatrlhf.trainers import ppo
from chatrlhf.vllm_backend import VLLMSampler, pack_outputs, sampler_weights
from conftest import EXAMPLES, run_cli


@dataclass
class FakeParams:  # vllm.SamplingParams' fields that the backend sets
    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    logprobs: int
    seed: int
    stop_token_ids: list = field(default_factory=list)


class FakeLLM:
    """vllm.LLM's calls the backend makes: generate, load_weights (through the engine's model path), sleep/wake_up,
    reset_prefix_cache. Its model starts as a copy of the policy; it learns only what is pushed."""

    def __init__(self, model, tok):
        self.model, self.tok, self.calls, self.loaded, self.asleep = copy.deepcopy(model), tok, [], [], False
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self.load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))

    def load_weights(self, weights):
        assert not self.asleep
        weights = dict(weights)
        self.loaded.append(weights)
        missing = self.model.load_state_dict(weights, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys  # every pushed name is one of the model's
        self.calls.append("load")

    def generate(self, prompts, params, use_tqdm=False):
        assert not self.asleep  # never sampled or loaded asleep
        self.calls.append("generate")
        out = []
        for p, sp in zip(prompts, params):
            c = Engine(self.model, self.tok, "float32").generate(
                [p["prompt_token_ids"]], SamplingParams(sp.max_tokens, sp.temperature, seed=sp.seed))[0]
            logprobs = [{t: SimpleNamespace(logprob=lp + 0.01)} for t, lp in zip(c.token_ids, c.logprobs)]
            out.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=c.token_ids, logprobs=logprobs)]))
        return out

    def sleep(self, level):
        self.asleep = True
        self.calls.append("sleep")

    def wake_up(self):
        self.asleep = False
        self.calls.append("wake_up")

    def reset_prefix_cache(self):
        self.calls.append("reset")


def test_the_pushed_weights_are_the_policy_with_its_lora_adapters_merged():
    policy, _ = load_model(ModelArgs(model="tiny-random-llama"), trainable=True, lora=LoraArgs(lora_r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B = 0 at the start: make the adapters change something
    pushed = dict(sampler_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()  # peft's own merge: the reference
    assert pushed.keys() == merged.keys()
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in merged)
    assert any(not torch.allclose(pushed[k], policy.get_base_model().state_dict()[k.replace("q_proj.", "q_proj.base_layer.")])
               for k in pushed if "q_proj.weight" in k)  # the merge moved the weights


def test_vllm_outputs_pack_into_the_engine_tensors():
    step = lambda t, lp: {t: SimpleNamespace(logprob=lp)}  # noqa: E731
    outs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6, 2], logprobs=[step(5, -1.0), step(6, -2.0), step(2, -0.5)])]),
            SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7], logprobs=[step(7, -3.0)])])]
    ids, mask, lp = pack_outputs(outs, 4, 0, "cpu")
    assert ids.tolist() == [[5, 6, 2, 0], [7, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert lp.tolist() == [[-1.0, -2.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]]


def test_truncated_importance_weights_hand_computed():
    trainer = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))  # ratios 2, 0.5, 3
    w, m = losses.truncated_importance_weights(trainer, sampler, torch.tensor([[1, 1, 0]]), cap=2.5)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 0.0])
    assert m["rollout/is_ratio_mean"] == pytest.approx(1.25) and m["rollout/is_truncated"] == 0.0
    w, m = losses.truncated_importance_weights(trainer, sampler, torch.ones(1, 3), cap=1.5)
    assert w[0].tolist() == pytest.approx([1.5, 0.5, 1.5]) and m["rollout/is_truncated"] == pytest.approx(2 / 3)
    adv, old = torch.ones(1, 3), trainer.clone()
    plain, _ = losses.ppo_policy_loss(trainer, old, adv, torch.ones(1, 3))  # ratio 1: −A per token
    weighed, _ = losses.ppo_policy_loss(trainer, old, adv, torch.ones(1, 3), weights=w)
    assert float(plain) == pytest.approx(-1.0) and float(weighed) == pytest.approx(-3.5 / 3)


def test_ppo_on_the_vllm_interface_pushes_every_update_and_weighs_its_tokens(tmp_path, monkeypatch):
    made = []

    def fake_sampler(tok, model_dir, dtype, gpu_memory, max_model_len):
        policy, _ = load_model(ModelArgs(model="tiny-random-llama"))
        made.append(VLLMSampler(tok, llm=FakeLLM(policy, tok), params_class=FakeParams))
        return made[-1]

    monkeypatch.setattr(ppo, "check_available", lambda device: None)  # as on a CUDA machine with vllm
    monkeypatch.setattr(ppo, "VLLMSampler", fake_sampler)
    cfg = PPOConfig(model="tiny-random-llama", data=[str(EXAMPLES / "dialogue_history.csv")], rollout_engine="vllm",
                    reward_fn=f"{EXAMPLES / 'reward.py'}:concise_on_topic", output_dir=str(tmp_path), max_steps=2,
                    batch_size=2, samples_per_prompt=2, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, lr=1e-3,
                    quiet=True, tensorboard=False, dtype="float32", eval_steps=100, tis_cap=1.5)
    ppo.train(cfg, log=lambda *a: None)
    llm = made[0].llm
    assert made[0].pushed == 3  # the starting weights, then after each of the 2 updates
    # asleep while the policy trains, woken to take the new weights (its prefix cache dropped), then sampling
    assert llm.calls == ["load", "reset", "generate", "sleep"] + ["wake_up", "load", "reset", "generate", "sleep"] + \
        ["wake_up", "load", "reset"]
    final, _ = load_model(ModelArgs(model=str(tmp_path)))
    assert all(torch.allclose(llm.model.state_dict()[k], v, atol=1e-6) for k, v in final.state_dict().items())
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "rollout/is_ratio_mean" in m]
    assert len(steps) == 2  # the stand-in's log-probs are 0.01 above the trainer's: ratios e^-0.01 < 1, none capped
    assert all(m["rollout/is_ratio_mean"] == pytest.approx(0.990, abs=2e-3) and m["rollout/is_truncated"] == 0
               for m in steps)


def test_the_vllm_backend_is_refused_on_cpu_and_its_flags_without_it(tmp_path):
    args = ["ppo", "--model", "tiny-random-llama", "--output-dir", tmp_path, "--data", EXAMPLES / "prompts.txt"]
    r = run_cli(*args, "--rollout-engine", "vllm")
    assert r.returncode == 2 and "--rollout-engine vllm: vLLM samples on a CUDA GPU and this run is on cpu" in r.stderr
    r = run_cli(*args, "--tis-cap", "3")
    assert r.returncode == 2 and "--tis-cap only work with --rollout-engine vllm" in r.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written
