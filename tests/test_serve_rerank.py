"""`chatrlhf serve --rerank`: the app in this process (Starlette's TestClient; no server process to start) on the tiny
model, best of 4 sampled candidates by a tiny random-head reward model. The returned replies are the candidates the
reward model scores highest (scored again here, best first), the store records every candidate's score and which
were returned, and what cannot be served (a stream, n over --candidates) is a 400 naming the field."""

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from chatrlhf.config import ModelArgs, ServeConfig
from chatrlhf.engine import Engine
from chatrlhf.feedback.tables import Reply
from chatrlhf.models import load_model
from chatrlhf.rerank import RMReranker
from chatrlhf.reward_model import load_reward_model, reward_scores
from chatrlhf.serve.app import create_app
from chatrlhf.serve.completions import Server
from chatrlhf.serve.feedback import FeedbackLog
from chatrlhf.serve.served import Served

MSG = [{"role": "user", "content": "Where is my order?"}]
N = 4


class Recording(RMReranker):
    """The reward model's reranker, recording the candidates it was asked to score."""
    asked: list = []

    def scores(self, histories, replies):
        self.asked.append((histories, replies))
        return super().scores(histories, replies)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, tok = load_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    rm, rm_tok = load_reward_model(ModelArgs(model="tiny-random-llama", dtype="float32"))
    reranker = Recording(rm.eval(), rm_tok, "rm:tiny", dtype="float32")
    cfg = ServeConfig(model="tiny-random-llama", model_name="tiny", rerank="rm:tiny", candidates=N, dtype="float32")
    engine = Engine(model.eval(), tok, "float32", max_batch=16).start()
    log = FeedbackLog(str(tmp_path_factory.mktemp("rerank") / "fb.db"), redacting=False)
    s = Server(Served(engine, "tiny", "tiny-random-llama", "tiny-random-llama"), cfg, [], log, None, reranker, N)
    with TestClient(create_app(s)) as client:
        yield client, reranker, rm, rm_tok, log
    engine.stop()


def test_the_reply_is_the_best_candidate_by_the_reward_model(served):
    client, reranker, rm, rm_tok, log = served
    for n in (1, 2):
        reranker.asked.clear()
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, "n": n, "temperature": 1.0,
                                                       "seed": 7, "max_tokens": 8})
        assert r.status_code == 200, r.text
        [(histories, candidates)] = reranker.asked
        assert histories == [MSG] * N and len(candidates) == N and len(set(candidates)) > 1   # sampled, distinct
        scores = reward_scores(rm, rm_tok, [MSG] * N, candidates)                              # scored again here
        best = sorted(range(N), key=lambda i: -scores[i])[:n]
        assert [c["message"]["content"] for c in r.json()["choices"]] == [candidates[k] for k in best]
        assert [c["index"] for c in r.json()["choices"]] == list(range(n))
    for _ in range(100):   # the store write runs after the reply
        with log.store.reading() as s:
            stored = s.scalars(select(Reply).where(Reply.completion_id == r.json()["id"])).all()
        if len(stored) == 2:
            break
        time.sleep(0.05)
    assert [x.text for x in sorted(stored, key=lambda x: x.choice_index)] == [candidates[k] for k in best]
    rerank = stored[0].decoding["rerank"]
    assert rerank["by"] == "rm:tiny" and rerank["picked"] == best and rerank["scores"] == pytest.approx(scores)
    assert stored[0].decoding["n"] == N and stored[0].model == "tiny"


def test_what_best_of_n_cannot_serve_is_a_400_naming_the_field(served):
    client = served[0]
    for extra, param in (({"stream": True}, "stream"), ({"n": N + 1}, "n")):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSG, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
