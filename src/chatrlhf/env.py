"""The multi-turn dialogue environment (Gymnasium API) on replayed conversations — QLEARN.md §2.1.

State = the conversation so far, action = a reply (text), reward = any reward source of rewards.py
scoring that reply for that history, next state = history + reply + the data's next user turn. An
episode is one dialogue: ``terminated`` after its last assistant turn, ``truncated`` at ``max_turns``.
With a ``UserSimulator`` (``DialogueEnv(..., user=UserSimulator(engine), max_turns=N)``) the user reacts:
once the agent's reply differs from the data's, a model playing the user writes the next user turns, and
the episode ends when it writes the stop marker ``[done]`` or at ``max_turns`` (QLEARN §2.6).

    env = DialogueEnv.from_file("examples/dialogue_history.csv", reward=...)
    obs, info = env.reset(seed=0)            # obs: the transcript as text; info["messages"]: structured
    obs, r, terminated, truncated, info = env.step("Sorry to hear that — what is the order number?")

Replayed user turns do not react to the reply: the dynamics do not depend on the action, so on this
environment Q-learning is a per-turn contextual bandit and γ = 0 is the honest baseline (QLEARN §2.6).
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Callable, Sequence

import gymnasium as gym
import torch
from gymnasium import spaces

from chatrlhf.data import as_conversations, load_records
from chatrlhf.data.records import Conversation, Message, prompt_key
from chatrlhf.engine import Engine, SamplingParams
from chatrlhf.errors import UsageError

REPLACEMENT = "\ufffd"  # what any character outside the charset becomes, so every observation is in the space
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
Reward = Callable[[list[list[Message]], list[str]], Sequence[float | None]]  # rewards.py's call shape


# --------------------------------------------------------------------------- text


def normalise(text: str, charset: frozenset[str]) -> str:
    """NFKC-normalised ``text`` with every character outside ``charset`` replaced by U+FFFD."""
    return "".join(c if c in charset else REPLACEMENT for c in unicodedata.normalize("NFKC", text))


def make_charset(dialogues: list[list[Message]]) -> str:
    """string.printable ∪ every character of the (NFKC-normalised) data ∪ U+FFFD, sorted."""
    chars = set(string.printable) | {REPLACEMENT}
    for messages in dialogues:
        for m in messages:
            chars |= set(unicodedata.normalize("NFKC", m["content"]))
    return "".join(sorted(chars))


def render(messages: list[Message]) -> str:
    """The transcript as 'User: …' / 'Assistant: …' lines (the seed CSV's history format, which
    data.parse_turns reads back)."""
    return "\n".join(f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)


def same_text(a: str, b: str) -> bool:
    """Equal up to whitespace and case, as ``prompt_key`` compares turns."""
    return " ".join(a.split()).lower() == " ".join(b.split()).lower()


def user_turns_key(messages: list[Message]) -> str:
    """The reference key of a history on replayed data: its user turns alone. The human reply of a turn
    depends on the dialogue and the turn, not on what the agent said before it."""
    return prompt_key([m for m in messages if m["role"] == "user"])


# --------------------------------------------------------------------------- data


def merge_prefixes(conversations: list[Conversation | list[Message]]) -> list[list[Message]]:
    """Whole dialogues from conversations: the seed CSV holds one row per turn, each row's history
    repeating the rows before it, so a conversation that is a prefix of another (or a duplicate) is
    dropped. Order of first appearance is kept."""
    msgs = [c.messages if isinstance(c, Conversation) else c for c in conversations]
    keys = [tuple((m["role"], " ".join(m["content"].split())) for m in ms) for ms in msgs]
    prefixes = {k[:i] for k in keys for i in range(1, len(k))}
    seen, out = set(), []
    for ms, k in zip(msgs, keys):
        if k not in prefixes and k not in seen:
            seen.add(k)
            out.append(ms)
    return out


def reference_key(simulated: bool) -> Callable[[list[Message]], str]:
    """The key a history's human reply is looked up by (``turn_references``, ``SimilarityReward(key=...)``). On
    replayed data, the user turns alone: the next user turn is the data's whatever the agent said, so the human
    reply of the turn still applies. With a user simulator, the whole history (``prompt_key``): once the agent's
    reply differs from the data's the conversation is no longer the data's, and no human reply exists for it —
    even when the simulator happens to write the data's next user turn word for word."""
    return prompt_key if simulated else user_turns_key


def turn_references(dialogues: list[list[Message]], key=user_turns_key) -> dict[str, list[str]]:
    """{key(history): human replies at that turn}, for ``SimilarityReward(refs, key=key)``: the reward of a reply
    is its similarity to the data's reply at that turn of that dialogue (``key``: see ``reference_key``)."""
    refs: dict[str, list[str]] = {}
    for messages in dialogues:
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                refs.setdefault(key(messages[:i]), []).append(m["content"])
    return refs


def check_dialogues(dialogues: list[list[Message]], where: list[str]) -> None:
    if not dialogues:
        raise UsageError("DialogueEnv: no dialogues given", "give at least one conversation with an assistant turn")
    for i, (messages, loc) in enumerate(zip(dialogues, where)):
        name = f"dialogue {i}" + (f" ({loc})" if loc else "")
        roles = [m["role"] for m in messages]
        if "assistant" not in roles:
            raise UsageError(f"DialogueEnv: {name} has no assistant turn, so there is no reply to take",
                             "give conversations that contain the assistant's replies, or drop it")
        if "user" not in roles[:roles.index("assistant")]:
            raise UsageError(f"DialogueEnv: {name} starts with an assistant turn, before any user turn",
                             "start every dialogue with the user's message")


def mixed_reward(mix, step: Callable[[], int] = lambda: 0) -> Reward:
    """A rewards.RewardMix as an environment reward: its scheduled, normalised sum at ``step()`` (replies
    are whole texts here, so each counts as ended)."""
    def reward(prompts, responses):
        return mix(prompts, responses, [True] * len(responses), step())[0]
    return reward


# --------------------------------------------------------------------------- the user simulator

STOP_MARKER = "[done]"  # the simulator ends the conversation by writing this (any case); the text before it stays
USER_OPENER = "Hello! How can I help you today?"  # the simulator's view opens with the assistant greeting the user
USER_INSTRUCTION = (
    "You are a person chatting with an AI assistant, not the assistant. You opened the conversation with this "
    "message, and what it asks for is your goal: \"{goal}\"\n"
    "Write your next message to the assistant as that person: one short message in your own words that reacts to "
    "what the assistant just said. Do not repeat yourself and do not answer your own question. When your goal is "
    "met, or you want to end the conversation, write " + STOP_MARKER + ".")


def simulator_messages(messages: list[Message], instruction: str = USER_INSTRUCTION) -> list[Message]:
    """The conversation as the user simulator sees it (τ-bench's and LMRL-Gym's recipe: a chat model plays the
    user): a system message with the instruction and the goal (the opening user turn), the opener, then every
    turn with the roles swapped — the agent's replies are the simulator's "user" turns and the user's turns its
    own "assistant" turns, so it writes the next user turn as an ordinary assistant reply. Roles alternate from
    the opener on, as strict chat templates require."""
    goal = next((m["content"] for m in messages if m["role"] == "user"), "")
    swapped = {"user": "assistant", "assistant": "user"}
    return ([{"role": "system", "content": instruction.format(goal=goal)}, {"role": "user", "content": USER_OPENER}]
            + [{"role": swapped[m["role"]], "content": m["content"]} for m in messages if m["role"] in swapped])


def split_stop(text: str) -> tuple[str, bool]:
    """(the user turn, whether the simulator ended the conversation): the text before the first STOP_MARKER
    (case-insensitive), stripped."""
    cut = text.lower().find(STOP_MARKER)
    return (text.strip(), False) if cut < 0 else (text[:cut].strip(), True)


class UserSimulator:
    """A causal LM playing the user, through the generation engine: ``sim(messages, seed) -> (text, ended)``
    writes the user's next turn after ``messages`` (the conversation so far, ending with the agent's reply).
    Sampled (T = 0.7 by default: varied users that stay on topic) from a generator seeded with ``seed``, which
    DialogueEnv draws from its ``np_random``: the same env seed gives the same user turns."""

    def __init__(self, engine: Engine, params: SamplingParams | None = None, instruction: str = USER_INSTRUCTION,
                 name: str = ""):
        self.engine, self.instruction, self.name = engine, instruction, name
        params = params or SamplingParams(max_tokens=48, temperature=0.7, top_k=0, top_p=1.0)
        stops = [STOP_MARKER, STOP_MARKER.upper(), STOP_MARKER.title()]  # the engine's stop strings match exactly
        self.params = SamplingParams(**{**params.__dict__, "n": 1, "stop": [*params.stop, *stops]})

    def prompt(self, messages: list[Message]) -> list[Message]:
        return simulator_messages(messages, self.instruction)

    def __deepcopy__(self, memo) -> UserSimulator:
        return self  # gymnasium.make deep-copies its kwargs: share the model (and its engine's lock), never copy it

    def __call__(self, messages: list[Message], seed: int) -> tuple[str, bool]:
        generator = torch.Generator(self.engine.device).manual_seed(seed)
        done = self.engine.generate([self.prompt(messages)], self.params, generator=generator)[0]
        # the engine's text is cut before a stop string: decode the tokens to see whether it was the marker
        return split_stop(self.engine.tok.decode(done.token_ids, skip_special_tokens=True))


# --------------------------------------------------------------------------- the environment


class DialogueEnv(gym.Env):
    """Multi-turn dialogues as a Gymnasium environment: user turns replayed from the data, or written by a
    ``UserSimulator`` once the agent leaves the data.

    observation: the transcript (``render``) as text, NFKC-normalised into ``charset``, its last
    ``max_history_chars`` characters; action: the reply text (any string; it is normalised the same way in
    the observation, the structured ``info["messages"]`` keep it as given). ``info``: ``messages``,
    ``dialogue`` (index), ``turn`` (replies given so far), ``human_reply`` (the data's reply for exactly this
    history, None once terminated or once the conversation left the data); after a step also ``reward_raw``
    (the source's value, None = no opinion → 0).

    ``user``: with a simulator the first user turn is the data's, and so is every next one while the agent gives
    the data's replies (whitespace and case aside: the logged user's reaction to exactly this history); from
    the first reply that differs, or when the data runs out, the simulator writes the user turns (seeded from
    ``np_random``). The episode then ends when the simulator writes ``STOP_MARKER`` (terminated) or at
    ``max_turns`` (truncated; required with a simulator).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # fps: unused by text, but the checker wants one

    def __init__(self, dialogues: list[Conversation | list[Message]], reward: Reward, max_turns: int | None = None,
                 max_history_chars: int = 8192, max_reply_chars: int = 1024, render_mode: str | None = None, *,
                 user: UserSimulator | None = None):
        where = [c.where if isinstance(c, Conversation) else "" for c in dialogues]
        self.dialogues = [list(c.messages if isinstance(c, Conversation) else c) for c in dialogues]
        check_dialogues(self.dialogues, where)
        if max_turns is not None and max_turns < 1:
            raise UsageError(f"DialogueEnv: max_turns must be at least 1, got {max_turns}", "e.g. --max-turns 8")
        if user is not None and max_turns is None:
            raise UsageError("DialogueEnv: a user simulator needs max_turns (it may never end the conversation)",
                             "give --max-turns N (max_turns=N), e.g. --max-turns 4")
        if render_mode not in (None, "ansi"):
            raise UsageError(f"DialogueEnv: render_mode '{render_mode}' is not supported", "use 'ansi' or None")
        self.reward_fn, self.max_turns, self.render_mode, self.user = reward, max_turns, render_mode, user
        self.reference_key = reference_key(user is not None)
        self.charset = make_charset(self.dialogues)
        self._chars = frozenset(self.charset)
        self.observation_space = spaces.Text(max_history_chars, min_length=0, charset=self.charset)
        self.action_space = spaces.Text(max_reply_chars, min_length=0, charset=self.charset)
        self._index, self._turn, self._pos, self._done, self._messages = 0, 0, 0, False, []

    @classmethod
    def from_file(cls, path: str, reward: Reward, **kwargs) -> DialogueEnv:
        """Dialogues from a conversation file (seed CSV, conversations JSONL, OASST trees, …): per-turn rows
        are merged into whole dialogues (``merge_prefixes``)."""
        return cls(merge_prefixes(as_conversations(load_records(path))), reward, **kwargs)

    def _advance(self, start: int) -> None:
        """Append the data's turns from ``start`` up to the next assistant turn; ``_pos`` = that turn or None."""
        messages = self.dialogues[self._index]
        pos = next((i for i in range(start, len(messages)) if messages[i]["role"] == "assistant"), None)
        self._messages += [dict(m) for m in messages[start:pos]] if pos is not None else []
        self._pos = pos

    def _simulate(self) -> bool:
        """The simulator's next user turn (appended unless it only ended the conversation); True when it ended."""
        text, ended = self.user([dict(m) for m in self._messages], int(self.np_random.integers(2 ** 31)))
        if text or not ended:
            self._messages.append({"role": "user", "content": text})
        return ended

    def _obs(self) -> str:
        text = normalise(render(self._messages), self._chars)
        return text[-self.observation_space.max_length:] if self.observation_space.max_length else ""

    def _info(self) -> dict:
        human = None if self._pos is None or self._done else self.dialogues[self._index][self._pos]["content"]
        return {"messages": [dict(m) for m in self._messages], "dialogue": self._index, "turn": self._turn,
                "human_reply": human}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = (options or {}).get("dialogue_index")
        if index is None:
            index = int(self.np_random.integers(len(self.dialogues)))
        elif not 0 <= int(index) < len(self.dialogues):
            raise UsageError(f"DialogueEnv.reset: dialogue_index {index} is out of range",
                             f"there are {len(self.dialogues)} dialogues (0–{len(self.dialogues) - 1})")
        self._index, self._turn, self._done, self._messages = int(index), 0, False, []
        self._advance(0)
        return self._obs(), self._info()

    def step(self, action: str):
        if self._done:
            raise RuntimeError("DialogueEnv.step after the episode terminated: call reset() first")
        if not isinstance(action, str):
            raise TypeError(f"DialogueEnv.step expects the reply as a str, got {type(action).__name__}")
        raw = list(self.reward_fn([[dict(m) for m in self._messages]], [action]))
        if len(raw) != 1:
            raise UsageError(f"the reward returned {len(raw)} values for 1 reply",
                             "return one float (or None) per reply")
        human = self._info()["human_reply"]
        self._messages.append({"role": "assistant", "content": action})
        self._turn += 1
        if self.user is None or (human is not None and same_text(action, human)):
            self._advance(self._pos + 1)  # replayed data, or still on the data's conversation
        else:
            self._pos = None              # left the data: no human reply for this history any more
        terminated = self._pos is None and (self.user is None or self._simulate())
        self._done = terminated
        truncated = not terminated and self.max_turns is not None and self._turn >= self.max_turns
        info = {**self._info(), "reward_raw": raw[0]}
        return self._obs(), 0.0 if raw[0] is None else float(raw[0]), terminated, truncated, info

    def render(self) -> str | None:
        return render(self._messages) if self.render_mode == "ansi" else None



# --------------------------------------------------------------------------- candidate replies


def dedupe(texts: list[str]) -> list[int]:
    """Indices of the first of each distinct text (whitespace-insensitive)."""
    seen, keep = set(), []
    for i, t in enumerate(texts):
        key = " ".join(t.split())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


class CandidateWrapper(gym.Wrapper):
    """Puts the candidate replies of each new state in ``info["candidates"]`` (QLEARN §2.3): ``n`` samples of
    the policy through the generation engine (one prefill shared by the n rows), then the human reply of that
    turn when the data has one (unless ``human=False``), de-duplicated (the first of equal texts kept).
    ``info["candidate_logprobs"]``: each candidate's log π_β (sum over its tokens; None for the human reply), for
    CQL's importance weights. A terminated state has no candidates. ``reset(seed=…)`` seeds the sampling too, so
    candidates repeat."""

    def __init__(self, env: gym.Env, engine: Engine, n: int = 5, params: SamplingParams | None = None,
                 human: bool = True):
        super().__init__(env)
        if n < 0:
            raise UsageError(f"CandidateWrapper: n must be ≥ 0, got {n}", "e.g. --candidates 5")
        self.engine, self.n, self.human = engine, n, human
        # T = 1, no top-k/top-p: diverse candidates whose log-probs are those of π_β (QLEARN §2.3)
        self.params = params or SamplingParams(max_tokens=64, temperature=1.0, top_k=0, top_p=1.0)
        self.generator: torch.Generator | None = None

    def candidates(self, info: dict, done: bool) -> dict:
        texts, logps = [], []
        if not done and self.n:
            params = SamplingParams(**{**self.params.__dict__, "n": self.n})
            for c in self.engine.generate([info["messages"]], params, generator=self.generator):
                texts.append(c.text)
                logps.append(float(sum(c.logprobs)))
        if not done and self.human and info.get("human_reply") is not None:
            texts.append(info["human_reply"])
            logps.append(None)
        keep = dedupe(texts)
        return {**info, "candidates": [texts[i] for i in keep], "candidate_logprobs": [logps[i] for i in keep]}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self.generator = torch.Generator(self.engine.device).manual_seed(seed)
        return obs, self.candidates(info, done=False)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self.candidates(info, done=terminated)


# gymnasium.make("chatrlhf/Dialogue-v0", dialogues=..., reward=...) — gives the env a spec (render checks, wrappers)
gym.register(id="chatrlhf/Dialogue-v0", entry_point="chatrlhf.env:DialogueEnv")
