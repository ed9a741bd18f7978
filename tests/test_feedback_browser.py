"""The feedback app in a real headless Chromium (Debian's, driven by Playwright) against a real server
process: log in, rate with the keyboard, compare with a tie, write a correction, export as admin."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import free_port
from sqlalchemy import select

from chatrlhf.feedback.store import Comparison, Correction, Rating, Store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def server(tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium missing: .ci/run should have installed Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
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
