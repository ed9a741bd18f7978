"""Multi-turn rollouts for PPO (``chatrlhf ppo --env dialogue``): whole episodes of the dialogue environment
(env.DialogueEnv), played in lockstep so that every turn's replies are sampled in one batch through the engine,
then laid out as one :class:`rollout.Rollout` row per assistant turn.

A row's query is the conversation so far (the user's turns and the policy's own earlier replies, rendered with
the chat template and its generation prompt), its response the tokens the policy sampled at that turn. So the
user's turns are context only: they never sit in a response, the loss mask never covers them, and every sampled
token is trained exactly once, in its own turn's row. (verl, OpenRLHF and SkyRL concatenate a whole trajectory and
zero a loss mask over the environment's tokens; a row per turn trains the same tokens and keeps the single-turn
PPO code — one prefix per row, GAE within the reply — unchanged.)

The environment is the dynamics only: its reward function is ``no_reward``, and the trainer scores all the turns of
a step in one batch with the reward mix afterwards (the reward model batched, the running moments updated once per
step as in single-turn PPO). A user simulator in the environment works the same way: nothing here reads the data's
human reply.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatrlhf.data import as_conversations, load_records, split_by_prompt
from chatrlhf.data.records import Conversation, Message
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.env import DialogueEnv, merge_prefixes
from chatrlhf.errors import UsageError
from chatrlhf.rollout import Rollout, decode_replies, encode_prompts, ended_with_eos


def load_dialogues(paths: list[str], fmt: str) -> list[list[Message]]:
    """Whole dialogues from conversation files (the seed CSV's per-turn rows merged)."""
    return merge_prefixes([c for path in paths for c in as_conversations(load_records(path, fmt))])


def no_reward(prompts, responses) -> list[None]:
    """The environments' reward: none (the trainer scores every turn of a step in one batch afterwards)."""
    return [None] * len(responses)


def make_envs(dialogues: list[list[Message]], n: int, max_turns: int | None, **env_args) -> list[DialogueEnv]:
    """``n`` environments on the same dialogues, one per episode played in lockstep (``env_args``: more of
    DialogueEnv's keyword arguments)."""
    return [DialogueEnv(dialogues, no_reward, max_turns=max_turns, **env_args) for _ in range(n)]


@dataclass
class Turn:
    """One assistant turn of one episode."""
    episode: int                  # the episode (index of its environment)
    turn: int                     # replies given before it in the episode
    messages: list[Message]       # the conversation it answers
    response: list[int]           # the sampled tokens (EOS included when it ended)
    logprobs: list[float]         # the sampler's log-probs of them
    text: str
    ended: bool                   # the reply emitted EOS
    terminated: bool              # the episode ended after it (no bootstrap)
    truncated: bool               # the episode was cut after it (--max-turns): bootstrapped from next_messages
    next_messages: list[Message]  # the conversation after it (the state the next turn answers)


@torch.no_grad()
def play(policy, tok, envs: list[DialogueEnv], starts: list[tuple[int, int]], params: SamplingParams,
         max_prompt_length: int, dtype: str, gen: torch.Generator) -> list[Turn]:
    """Play one episode on each environment, all in lockstep: env k starts at dialogue ``starts[k][0]`` with reset
    seed ``starts[k][1]``; at each round the episodes still running get their replies in one sampled batch. Returns
    the turns in the order they were played."""
    infos = [env.reset(seed=seed, options={"dialogue_index": index})[1] for env, (index, seed) in zip(envs, starts)]
    device = next(policy.parameters()).device
    engine = Engine(policy, tok, dtype)
    active, turns = list(range(len(envs))), []
    policy.eval()
    while active:
        histories = [infos[k]["messages"] for k in active]
        q, qm = encode_prompts(tok, histories, max_prompt_length, device)
        ids, mask, lp = engine.sample_tensors(q, qm, params, gen)
        texts, ended = decode_replies(tok, ids, mask), ended_with_eos(ids, tok.eos_token_id).tolist()
        running = []
        for row, k in enumerate(active):
            _, _, terminated, truncated, info = envs[k].step(texts[row])
            keep = mask[row].bool()
            turns.append(Turn(k, infos[k]["turn"], histories[row], ids[row][keep].tolist(), lp[row][keep].tolist(),
                              texts[row], bool(ended[row]), bool(terminated), bool(truncated), info["messages"]))
            infos[k] = info
            if not (terminated or truncated):
                running.append(k)
        active = running
    return turns


@dataclass
class Episodes:
    """How the rows of a multi-turn Rollout (B rows, one per turn, in (episode, turn) order) link up."""
    episode: torch.Tensor         # (B,) the episode of each row
    turn: torch.Tensor            # (B,) its turn in the episode (0-based)
    next_row: torch.Tensor        # (B,) the row of the episode's next turn, −1 after its last turn
    truncated: torch.Tensor       # (B,) bool: the episode was cut after this row (bootstrapped, not terminal)
    cut_states: list              # the conversations the truncated rows led to, in row order

    @property
    def n(self) -> int:
        return int(self.episode.max()) + 1 if len(self.episode) else 0


def to_rollout(turns: list[Turn], tok, max_prompt_length: int, device) -> tuple[Rollout, Episodes, torch.Tensor]:
    """(rollout, links, sampler log-probs (B, R)): one row per turn, in (episode, turn) order; queries left-padded
    as the sampler saw them, responses right-padded; log-probs, values and rewards still empty."""
    turns = sorted(turns, key=lambda t: (t.episode, t.turn))
    q, qm = encode_prompts(tok, [t.messages for t in turns], max_prompt_length, device)
    width = max(len(t.response) for t in turns)
    ids = torch.full((len(turns), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(turns), width), dtype=torch.long)
    sample_lp = torch.zeros((len(turns), width))
    for i, t in enumerate(turns):
        ids[i, :len(t.response)] = torch.tensor(t.response, dtype=torch.long)
        mask[i, :len(t.response)] = 1
        sample_lp[i, :len(t.response)] = torch.tensor(t.logprobs)
    ids, mask, sample_lp = ids.to(device), mask.to(device), sample_lp.to(device)
    zeros = torch.zeros_like(sample_lp)
    r = Rollout(q, qm, ids, mask, zeros, zeros, zeros, zeros[:, 0], zeros, zeros, zeros, [t.messages for t in turns],
                [t.text for t in turns], torch.tensor([t.ended for t in turns], device=device))
    last = [i + 1 == len(turns) or turns[i + 1].episode != t.episode for i, t in enumerate(turns)]
    links = Episodes(torch.tensor([t.episode for t in turns]), torch.tensor([t.turn for t in turns]),
                     torch.tensor([-1 if end else i + 1 for i, end in enumerate(last)]),
                     torch.tensor([t.truncated for t in turns]),
                     [t.next_messages for t in turns if t.truncated])
    return r, links, sample_lp


def state_rollout(tok, histories: list[list[Message]], max_prompt_length: int, device) -> Rollout:
    """A rollout whose rows read V(s) of the conversations ``histories`` at their first (and only) reply position:
    the value at the position that predicts a reply's first token, which causal attention keeps from seeing the
    stand-in reply token (EOS)."""
    q, qm = encode_prompts(tok, histories, max_prompt_length, device)
    ids = torch.full((len(histories), 1), tok.eos_token_id, dtype=torch.long, device=device)
    zeros = torch.zeros((len(histories), 1), device=device)
    return Rollout(q, qm, ids, torch.ones_like(ids), zeros, zeros, zeros, zeros[:, 0], zeros, zeros, zeros,
                   histories, [""] * len(histories))


def episode_sums(values: torch.Tensor, links: Episodes, gamma: float = 1.0) -> torch.Tensor:
    """(episodes,) Σ_t γ^t values_t per episode, ``values`` (B,) one per row (turn)."""
    out = torch.zeros(links.n, dtype=values.dtype)
    return out.index_add_(0, links.episode, values.cpu() * gamma ** links.turn.to(values.dtype))


def split_dialogues(data: list[str], eval_data: list[str], fmt: str, eval_fraction: float,
                    seed: int) -> tuple[list, list]:
    """Train and held-out dialogues: ``eval_data``, else a split by first prompt with ``seed``."""
    dialogues = load_dialogues(data, fmt)
    if eval_data:
        train_part, held = dialogues, load_dialogues(eval_data, fmt)
    else:
        a, b = split_by_prompt([Conversation(d) for d in dialogues], eval_fraction, seed)
        train_part, held = [c.messages for c in a], [c.messages for c in b]
    if not train_part:
        raise UsageError(f"--data {','.join(data)}: no training dialogues left", "give more dialogues or a lower "
                         "--eval-fraction")
    return train_part, held
