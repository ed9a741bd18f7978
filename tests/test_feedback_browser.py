"""The feedback app in a real headless Chromium (Debian's, driven by Playwright) against a real server
process: log in, rate with the keyboard, compare with a tie, write a correction, export as admin."""

import json
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import CHROMIUM, chromium, free_port
from sqlalchemy import select

from chatrlhf.feedback.store import Comparison, Correction, Rating, Store


@pytest.fixture
def server(tmp_path):
    chromium()
    db = tmp_path / "fb.db"
    store = Store(str(db))
    store.add_user("boss", "correct horse", "admin")
    store.add_user("ann", "correct horse")
    for kind, prompt in (("rate", "How do I boil an egg?"), ("compare", "Name a prime."), ("correct", "Say hi.")):
        pid = store.add_prompt([{"role": "user", "content": prompt}])
        a = store.add_reply(pid, "Put it in boiling water for 9 minutes." if kind == "rate" else "7" if kind == "compare"
                            else "Hullo")
        b = store.add_reply(pid, "Eleven.") if kind == "compare" else None
        store.add_item(kind, a, b)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "feedback", "serve", "--db", str(db), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stdout.read()}")
    yield url, store, tmp_path
    proc.terminate()
    proc.wait(10)


def test_annotate_with_the_keyboard_then_export(server):
    from playwright.sync_api import expect, sync_playwright

    url, store, tmp = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/next")
        expect(page).to_have_url(url + "/login")  # no session: sent to log in
        page.fill("input[name=name]", "ann")
        page.fill("input[name=password]", "correct horse")
        page.click("input[type=submit]")

        expect(page.locator("#reply")).to_contain_text("boiling water")  # 1: rate with the keyboard
        page.keyboard.press("4")
        expect(page.locator("input[name=score][value='4']")).to_be_checked()
        page.keyboard.press("Enter")

        expect(page.locator("#left")).to_be_visible()  # 2: compare, a tie
        page.keyboard.press("3")
        expect(page.locator("button.choice.picked")).to_have_text("Tie 3")
        page.screenshot(path=str(tmp / "compare.png"), full_page=True)
        page.keyboard.press("Enter")

        box = page.locator("#corrected")  # 3: correct a reply
        expect(box).to_have_value("Hullo")
        box.fill("Hi! How can I help you today?")
        box.press("Control+Enter")
        expect(page.locator("#summary")).to_contain_text("You have given 3 answers")

        admin = browser.new_context(accept_downloads=True).new_page()  # 4: export as admin
        admin.goto(url + "/login")
        admin.fill("input[name=name]", "boss")
        admin.fill("input[name=password]", "correct horse")
        admin.click("input[type=submit]")
        expect(admin.locator("#users")).to_contain_text("ann")
        with admin.expect_download() as dl:
            admin.click("#export")
        dl.value.save_as(tmp / "export.zip")
        browser.close()

    assert (tmp / "compare.png").stat().st_size > 5000
    with store.session() as s:
        assert s.scalar(select(Rating.score)) == 4
        assert s.scalar(select(Comparison.choice)) == "tie"
        assert s.scalar(select(Correction.corrected)) == "Hi! How can I help you today?"
    z = zipfile.ZipFile(tmp / "export.zip")
    prefs = [json.loads(x) for x in z.read("preferences.jsonl").decode().splitlines()]
    assert [p["tie"] for p in prefs if p["source"] == "feedback"] == [True]
    assert [(p["chosen"], p["rejected"]) for p in prefs if p["source"] == "correction"] == \
        [("Hi! How can I help you today?", "Hullo")]


HOSTILE = ["<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 1">', "{{ 7 * 7 }} {% if 1 %}x{% endif %}",
           "'; DROP TABLE users; --", "nul\x00byte", "rtl \u202eevil\u202c end", "javascript:window.__pwned=1",
           "big " + "x" * 100_000]


def test_hostile_strings_stay_inert_through_import_answer_admin_and_export(server):
    """Script tags, template syntax, SQL, NUL, RTL override and a 100 kB string: uploaded through the admin's import,
    answered in the item page, listed on the admin page and exported — rendered in Chromium under the CSP with no
    script run, and stored and exported exactly."""
    from playwright.sync_api import sync_playwright

    url, store, tmp = server
    records = "".join(json.dumps({"prompt": h, "response": h, "score": 3}) + "\n" for h in HOSTILE).encode()
    store.add_user("<b>mallory</b> {{x}}", "correct horse")
    ran = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        admin = browser.new_context(accept_downloads=True).new_page()
        admin.on("dialog", lambda d: (ran.append(d.message), d.dismiss()))
        admin.goto(url + "/login")
        admin.fill("input[name=name]", "boss")
        admin.fill("input[name=password]", "correct horse")
        admin.click("input[type=submit]")
        csrf = admin.locator("input[name=csrf]").first.get_attribute("value")
        r = admin.request.post(url + "/admin/import", max_redirects=0, multipart={
            "csrf": csrf, "kind": "correct", "records": {"name": "hostile.jsonl", "mimeType": "application/json",
                                                          "buffer": records}})
        assert r.status == 303 and "imported=8" in r.headers["location"], r.text()
        admin.goto(url + "/admin")
        assert "<b>mallory</b> {{x}}" in admin.locator("#users").inner_text()  # shown as text, not bold
        assert "default-src 'none'" in admin.request.get(url + "/admin").headers["content-security-policy"]
        seen = 0
        while True:  # the admin answers every imported item, seeing each hostile prompt and reply
            admin.goto(url + "/next?kind=correct")
            if "/item/" not in admin.url:
                break
            seen += 1
            assert admin.evaluate("window.__pwned") is None
            box = admin.locator("#corrected")
            box.fill(box.input_value() + " (checked)")
            box.press("Control+Enter")
        assert seen >= len(HOSTILE) and "49" not in admin.locator("main").inner_text()
        admin.goto(url + "/admin")
        with admin.expect_download() as dl:
            admin.click("#export")
        dl.value.save_as(tmp / "export.zip")
        assert admin.evaluate("window.__pwned") is None
        browser.close()
    assert ran == []
    rows = [json.loads(x) for x in zipfile.ZipFile(tmp / "export.zip").read("corrections.jsonl").decode().splitlines()]
    rows = [r for r in rows if r["response"] != "Hullo"]  # the fixture's own item
    assert sorted(r["response"] for r in rows) == sorted(HOSTILE)  # stored and exported exactly, NUL included
    # (a browser's text box shows NUL as U+FFFD, so the typed corrections carry that instead)
    assert sorted(r["corrected"] for r in rows) == sorted(h.replace("\x00", "\ufffd") + " (checked)" for h in HOSTILE)
