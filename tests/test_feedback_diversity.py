"""The data-diversity summary of a feedback export: annotators' shares, lengths and topic clusters on a hand-made
export, and the diversity.json that `feedback export` writes next to its manifest."""

import json

from chatrlhf.feedback.diversity import diversity, length_stats, summary_line, topic_clusters
from chatrlhf.feedback.export import export
from chatrlhf.feedback.store import Store


def user(text):
    return [{"role": "user", "content": text}]


PASSWORD = ["How do I reset my password?", "I forgot my password and cannot log in",
            "The password reset email never arrived"]
PARCEL = ["Where is my parcel delivery?", "My parcel delivery is late", "When will my parcel arrive?"]


def hand_made():
    """Labels: a 3 (a vote, an aggregated vote a+b, a rating), b 2, c 1 (a correction; its preference row is the
    same label and is not counted twice)."""
    pref = {"chosen": "Click reset.", "rejected": "No.", "source": "feedback"}
    return {"preferences": [{**pref, "prompt": user(PASSWORD[0]), "annotator": "a"},
                            {**pref, "prompt": user(PASSWORD[1]), "annotator": "b"},
                            {**pref, "prompt": user(PASSWORD[2]), "annotator": "a,b"},
                            {"prompt": user(PARCEL[0]), "annotator": "c", "chosen": "It ships today by post.",
                             "rejected": "It ships today.", "source": "correction"}],
            "ratings": [{"prompt": user(PARCEL[1]), "annotator": "a", "response": "Sorry, it is on its way.",
                         "score": 4}],
            "corrections": [{"prompt": user(PARCEL[0]), "annotator": "c", "response": "It ships today.",
                             "corrected": "It ships today by post."}],
            "conversations": [{"messages": user(PARCEL[2]) + [{"role": "assistant", "content": "Tomorrow."}],
                               "annotator": "c"}]}


def test_the_summary_of_a_hand_made_export():
    d = diversity(hand_made(), k=2)
    a = d["annotators"]
    assert a["labels"] == 6 and a["top_share"] == 0.5 and list(a["annotators"]) == ["a", "b", "c"]
    assert a["annotators"]["b"] == {"labels": 2, "share": round(2 / 6, 4)}
    assert a["effective_annotators"] == round(1 / (0.5 ** 2 + (1 / 3) ** 2 + (1 / 6) ** 2), 3)  # 2.571
    # 6 distinct prompts of 6, 8, 6, 5, 5, 5 words; 5 distinct replies: Click reset. / No. / It ships today. /
    # It ships today by post. / Sorry, it is on its way. (2, 1, 3, 5, 6 words; an SFT row's reply is a correction's)
    assert d["lengths"]["prompt_words"] == {"count": 6, "mean": 5.83, "min": 5, "p10": 5.0, "median": 5.5,
                                            "p90": 7.0, "max": 8}
    assert d["lengths"]["reply_words"] == {"count": 5, "mean": 3.4, "min": 1, "p10": 1.4, "median": 3.0, "p90": 5.6,
                                           "max": 6}
    t = d["topics"]
    assert t["k"] == 2 and [c["size"] for c in t["clusters"]] == [3, 3]
    assert {c["top_terms"][0] for c in t["clusters"]} == {"password", "parcel"}
    assert "6 labels from 3 annotators (largest share 50%, a" in summary_line(d)


def test_small_and_empty_exports_say_why_there_are_no_clusters():
    assert topic_clusters(["the and of", "a the"])["note"] == "no words to cluster"
    assert topic_clusters(["reset password", "reset password"])["note"] == "fewer than 2 distinct prompts"
    assert length_stats([]) == {"count": 0}
    d = diversity({"preferences": [], "ratings": []})
    assert d["annotators"] == {"labels": 0, "annotators": {}, "top_share": 0.0, "effective_annotators": 0.0}


def test_export_writes_diversity_json_next_to_its_manifest(tmp_path):
    store = Store(str(tmp_path / "fb.db"))
    uid = store.add_user("ann", "correct horse").id
    for text in PASSWORD[:2]:
        pid = store.add_prompt(user(text))
        item = store.add_item("rate", store.add_reply(pid, f"reply to {text}"))
        store.lease(uid)
        assert store.submit(uid, item, score=4)[1]
    m = export(store, tmp_path / "exp")
    d = json.loads((tmp_path / "exp" / "diversity.json").read_text())
    assert d["annotators"]["annotators"] == {"ann": {"labels": 2, "share": 1.0}} and m["counts"]["ratings"] == 2
    assert d["lengths"]["prompt_words"]["count"] == 2 and d["topics"]["k"] == 2
    assert "diversity.json" not in json.dumps(m)  # the manifest's hash names the data files alone
