"""The /chat page of `chatrlhf serve` in a real headless Chromium (Debian's, driven by Playwright) against a real
server process (tiny model, --feedback-db on a SQLite file, an API key): a wrong key shows the 401 message; then
the right key, a streamed reply, a thumbs-up, a correction and a comparison — all found in the store on the
completion ids the server returned. The same browser then loads the page as a server without --feedback-db
renders it: no feedback controls. One server, one browser launch."""

import re
import time

import pytest
from sqlalchemy import select

from chatrlhf.feedback.store import Comparison, Correction, Item, Prompt, Rating, Reply, Store
from chatrlhf.serve.chat import PAGE, page_config
from conftest import CHROMIUM, chromium
from test_serve import opinionated_model_dir
from test_serve_feedback import KEY, healthy, spawn

BETTER = "Sorry for the wait! Your order ships tomorrow; here is the tracking link."


@pytest.fixture
def served(tmp_path):
    """The server (started first: it takes seconds) and, launched while it starts, the browser."""
    chromium()
    from playwright.sync_api import sync_playwright

    opinionated_model_dir(tmp_path / "model")
    db = tmp_path / "fb.db"
    proc, url = spawn(["--feedback-db", str(db)], tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            healthy(proc, url)
            yield url, db, browser
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)


def stored(store: Store, completion_id: str) -> list[Reply]:
    with store.reading() as s:
        return list(s.scalars(select(Reply).where(Reply.completion_id == completion_id).order_by(Reply.choice_index)))


def test_chat_page_streams_and_sends_every_kind_of_feedback(served):
    from playwright.sync_api import expect

    url, db, browser = served
    page = browser.new_page()
    served_page = page.goto(url + "/chat")                        # no key needed for the page itself
    assert served_page.status == 200 and "script-src 'nonce-" in served_page.headers["content-security-policy"]
    page.fill("#key", "wrong-key-0123456789")                     # 1: a wrong key: the server's 401 message
    page.press("#key", "Enter")
    expect(page.locator("#notice")).to_have_text("The server refused (401): incorrect API key")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('chatrlhf-api-key')") is None  # a refused key is forgotten
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(page.locator("#model")).to_have_text("— tiny")
    assert KEY not in page.url

    page.fill("#message", "Where is my order?")                    # 2: Enter sends; the reply streams in
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.press("#message", "Enter")
    assert sent.value.request.post_data_json["stream"] is True     # (a sampled reply may be one token long, so the
    assert sent.value.headers["content-type"].startswith("text/event-stream")  # stream is checked, not its pieces)
    reply = page.locator(".msg.assistant[data-done]")
    expect(reply).to_have_count(1, timeout=30_000)
    reply_id, chunks = reply.get_attribute("data-completion-id"), int(reply.locator(".text")
                                                                       .get_attribute("data-chunks"))
    assert chunks >= 1
    reply_text = reply.locator(".text").text_content()

    status = reply.locator(".status")
    reply.get_by_role("button", name="Good reply (thumbs up)").click()  # 3: thumbs up
    expect(status).to_have_text("Thanks, your feedback is saved.")
    expect(reply.get_by_role("button", name="Bad reply (thumbs down)")).to_be_disabled()

    reply.get_by_role("button", name="Suggest a better reply").click()  # 4: a correction, sent with the keyboard
    box = reply.get_by_label("A better reply")
    expect(box).to_be_focused()
    box.fill(BETTER)
    box.press("Control+Enter")
    expect(reply.locator("form.correction")).to_be_hidden()

    reply.get_by_role("button", name="Compare two answers").click()    # 5: two answers side by side, B wins
    panel = reply.locator(".compare[data-done]")
    expect(panel).to_have_count(1, timeout=30_000)
    sides = [t.text_content() for t in panel.locator(".reply").all()]
    compare_id = panel.get_attribute("data-completion-id")
    assert compare_id != reply_id
    expect(panel.get_by_role("button", name="A is better")).to_be_focused()
    panel.get_by_role("button", name="B is better").click()
    expect(panel.get_by_role("button", name="B is better")).to_have_attribute("aria-pressed", "true")
    expect(status).to_have_text("Thanks, your feedback is saved.")
    assert page.locator("#notice").text_content() == ""
    page.screenshot(path=str(db.parent / "chat.png"), full_page=True)
    assert (db.parent / "chat.png").stat().st_size > 5000

    plain = browser.new_page()                               # 6: the page of a server without --feedback-db
    plain.route(url + "/chat", lambda route: route.fulfill(response=(r := route.fetch()), body=r.text().replace(
        '"feedback": true', '"feedback": false')))
    plain.goto(url + "/chat")
    plain.fill("#key", KEY)
    plain.press("#key", "Enter")
    replies = plain.locator(".msg.assistant[data-done]")
    for n, text in enumerate(("Hello", "Thanks"), 1):           # the second request carries the first exchange
        plain.fill("#message", text)
        plain.press("#message", "Enter")
        expect(replies).to_have_count(n, timeout=30_000)
    assert plain.locator(".feedback").count() == 0 and plain.get_by_role("button", name="Compare two answers") \
        .count() == 0
    second_id, hello_reply = replies.nth(1).get_attribute("data-completion-id"), replies.nth(0).locator(
        ".text").text_content()

    # (a feedback waits for its completion's write, so the first reply and the comparison are in the store by now)
    store = Store(str(db))
    assert [r.text for r in stored(store, reply_id)] == [reply_text]
    assert [r.text for r in stored(store, compare_id)] == sides
    for _ in range(50):   # no feedback was sent on the last completion: its write may still be on its way
        if second := stored(store, second_id):
            break
        time.sleep(0.1)
    with store.reading() as s:
        def reply_of(reply_pk):
            r = s.get(Reply, reply_pk)
            return r.completion_id, r.choice_index

        ratings = s.execute(select(Rating.thumbs, Rating.score, Item.reply_a_id).join(Item)).all()
        assert [(t, score, reply_of(a)) for t, score, a in ratings] == [(1, None, (reply_id, 0))]
        corrections = s.execute(select(Correction.corrected, Item.reply_a_id).join(Item)).all()
        assert [(c, reply_of(a)) for c, a in corrections] == [(BETTER, (reply_id, 0))]
        comparisons = s.execute(select(Comparison.choice, Item.reply_a_id, Item.reply_b_id).join(Item)).all()
        assert [(c, reply_of(a), reply_of(b)) for c, a, b in comparisons] == [("b", (compare_id, 0), (compare_id, 1))]
        assert s.get(Reply, ratings[0][2]).prompt_id == s.get(Reply, comparisons[0][1]).prompt_id  # same messages
        assert s.get(Prompt, second[0].prompt_id).messages == [
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": hello_reply},
            {"role": "user", "content": "Thanks"}]


def test_page_config_says_whether_to_ask_for_a_key_and_to_show_feedback():
    assert page_config([], None) == {"keys": False, "feedback": False}
    assert page_config(["digest"], object()) == {"keys": True, "feedback": True}


def test_the_page_is_one_offline_file_with_one_slot_each_for_config_and_nonce():
    assert PAGE.count("{{config}}") == 1 and PAGE.count("{{nonce}}") == 1 and PAGE.count("<script") == 2
    assert not re.search(r"https?:|//[a-z]|src=|href=|@import|url\(", PAGE), "the page must load nothing from elsewhere"
