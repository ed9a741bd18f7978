"""The feedback web app's security and bad-input handling, through FastAPI's test client (the browser tests
drive the same app in Chromium)."""

import re

import pytest
from conftest import feedback_app, free_port
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from chatrlhf.feedback.app import create_app
from chatrlhf.feedback.store import Comparison, FeedbackError, Store

EVIL = "<script>document.title='pwned'</script> What is 2+2?"


@pytest.fixture
def app_store(tmp_path):
    store = Store(str(tmp_path / "fb.db"))
    store.add_user("boss", "correct horse", "admin")
    store.add_user("ann", "correct horse")
    store.add_user("bob", "correct horse")
    store.add_user("vic", "correct horse", "viewer")
    for i in range(3):
        pid = store.add_prompt([{"role": "user", "content": EVIL if i == 0 else f"prompt {i}"}])
        store.add_item("compare", store.add_reply(pid, f"A{i}"), store.add_reply(pid, f"B{i}"))
    return create_app(store), store


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def login(client, name, password="correct horse"):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"name": name, "password": password, "csrf": token})


def client_for(app, name=None):
    c = TestClient(app, follow_redirects=False)
    if name:
        assert login(c, name).status_code == 303
    return c


def test_every_route_refuses_a_request_without_a_session(app_store):
    app, _ = app_store
    c = client_for(app)
    open_routes = {"/login", "/api/login"}
    checked = 0
    for route in app.routes:
        if not hasattr(route, "methods") or route.path in open_routes:
            continue
        path = re.sub(r"\{\w+\}", "1", route.path)
        for method in route.methods - {"HEAD"}:
            r = c.request(method, path)
            refused = r.status_code in (401, 403) or (r.status_code == 303 and r.headers["location"] == "/login")
            assert refused, (method, path, r.status_code)
            checked += 1
    assert checked >= 12


def test_session_cookie_is_httponly_and_samesite(app_store):
    app, _ = app_store
    c = client_for(app)
    cookie = login(c, "ann").headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_annotators_see_only_their_items_and_never_admin_pages(app_store):
    app, store = app_store
    ann, bob, vic = client_for(app, "ann"), client_for(app, "bob"), client_for(app, "vic")
    item = ann.get("/next").headers["location"]
    assert ann.get(item).status_code == 200
    assert bob.get(item).status_code == 404  # leased by ann, not by bob: as if it did not exist
    for c in (ann, vic):
        assert c.get("/admin").status_code == 403
        assert c.get("/admin/export.zip").status_code == 403
        assert c.post("/admin/users", data={"csrf": "x", "name": "eve", "password": "12345678"}).status_code == 403
    assert vic.get("/next").status_code == 403  # viewers do not annotate
    assert "eve" not in [u.name for u in store.users()]


def test_script_in_a_prompt_renders_inert(app_store):
    app, _ = app_store
    ann = client_for(app, "ann")
    page = ann.get(ann.get("/next").headers["location"]).text
    assert "<script>document.title" not in page and "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in page


def test_forms_without_the_csrf_token_are_refused(app_store):
    app, store = app_store
    ann = client_for(app, "ann")
    item = ann.get("/next").headers["location"]
    assert ann.post(item, data={"choice": "left"}).status_code == 403
    assert ann.post(item, data={"choice": "left", "csrf": "forged"}).status_code == 403
    assert ann.post("/api" + item.replace("/item", "/items"), json={"choice": "a"}).status_code == 403
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 0
    # and a log-in form without it
    assert client_for(app).post("/login", data={"name": "ann", "password": "correct horse"}).status_code == 403


def test_bad_input_gets_4xx_and_double_submits_store_one_answer(app_store):
    app, store = app_store
    ann = client_for(app, "ann")
    item = ann.get("/next").headers["location"]
    token = csrf_of(ann.get(item).text)
    api = "/api" + item.replace("/item", "/items")
    h = {"x-csrf-token": token}
    assert ann.post(api, content=b'{"choice": "a"}', headers=h).status_code == 415  # JSON writes only as JSON
    h["content-type"] = "application/json"
    assert ann.post(api, content=b"{not json", headers=h).status_code == 400
    assert ann.post(api, content=b"[1, 2]", headers=h).status_code == 400
    assert ann.post(api, json={"choice": "maybe"}, headers=h).status_code == 400
    assert ann.post(api, json={"choice": "a", "confidence": "very"}, headers=h).status_code == 400
    for big in (b"x" * 300_000, (b"x" * 1000 for _ in range(300))):  # by Content-Length, and streamed
        r = ann.post(api, content=big, headers=h)
        assert r.status_code == 413 and "over 262144 bytes" in r.json()["error"]
    assert ann.post("/api/items/999", json={"choice": "a"}, headers=h).status_code == 404
    assert ann.get("/item/not-a-number").status_code == 400
    assert ann.post(item, content=b"\xff\xfe=\x00", headers={"content-type": "multipart/form-data; boundary=x"}).status_code in (400, 403)
    first = ann.post(api, json={"choice": "a"}, headers=h)
    again = ann.post(api, json={"choice": "b"}, headers=h)
    assert (first.status_code, again.status_code) == (201, 200) and first.json()["answer"] == again.json()["answer"]
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 1


def test_login_is_rate_limited(app_store):
    app, _ = app_store
    c = client_for(app)
    for _ in range(5):
        assert login(c, "ann", "wrong password").status_code == 401
    assert login(c, "ann", "wrong password").status_code == 429
    assert login(c, "ann").status_code == 429  # even the right password waits out the minute


def test_production_mode_has_no_default_admin_and_needs_a_secret(tmp_path):
    store = Store(str(tmp_path / "fb.db"))
    with pytest.raises(FeedbackError, match="secret"):
        create_app(store, production=True)
    with pytest.raises(FeedbackError, match="admin"):
        create_app(store, secret="s" * 32, production=True)
    store.add_user("boss", "correct horse", "admin")
    assert create_app(store, secret="s" * 32, production=True)


def test_admin_imports_and_exports(app_store):
    import io
    import json
    import zipfile

    app, store = app_store
    boss = client_for(app, "boss")
    token = csrf_of(boss.get("/admin").text)
    rows = "\n".join(json.dumps({"prompt": f"new {i}", "chosen": "good", "rejected": "bad"}) for i in range(2))
    r = boss.post("/admin/import", data={"csrf": token, "records": rows, "k": "2"})
    assert r.status_code == 303 and r.headers["location"].endswith("imported=2")
    bad = boss.post("/admin/import", data={"csrf": token, "records": '{"prompt": "x", "chosen": 3}', "k": "1"})
    assert bad.status_code == 400 and "chosen" in bad.text
    z = zipfile.ZipFile(io.BytesIO(boss.get("/admin/export.zip?rule=majority").content))
    manifest = json.loads(z.read("manifest.json"))
    assert manifest["rule"] == "majority" and "preferences.jsonl" in z.namelist()


def test_chat_with_a_model_stores_each_reply_with_provenance_to_rate(tmp_path):
    from chatrlhf.feedback.store import Item, Rating, Reply

    store = Store(str(tmp_path / "fb.db"))
    store.add_user("ann", "correct horse")
    ann = client_for(create_app(store, models=["tiny-random-llama"], max_new_tokens=6), "ann")
    token = csrf_of(ann.get("/chat").text)
    r = ann.post("/chat", data={"csrf": token, "message": "Hello <b>there</b>"})
    assert r.status_code == 303 and r.headers["location"].endswith("?then=chat")
    page = ann.get(r.headers["location"]).text
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in page and 'name="then" value="chat"' in page
    item = int(r.headers["location"].split("/")[2].split("?")[0])
    back = ann.post(f"/item/{item}", data={"csrf": token, "score": "2", "then": "chat"})
    assert back.headers["location"] == "/chat"
    with store.session() as s:
        reply = s.scalar(select(Reply))
        assert reply.model == "tiny-random-llama" and reply.decoding["max_new_tokens"] == 6
        assert reply.decoding["temperature"] == 0.7 and "Hello <b>there</b>" in reply.template
        assert s.get(Item, item).reply_a_id == reply.id and s.scalar(select(Rating.score)) == 2
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in ann.get("/chat").text  # the conversation goes on
    assert ann.post("/chat", data={"csrf": token, "message": "  "}).status_code == 400


def test_admin_generates_compare_items_from_two_models(tmp_path):
    from chatrlhf.feedback.store import Item, Reply

    store = Store(str(tmp_path / "fb.db"))
    store.add_user("boss", "correct horse", "admin")
    for p in ("first prompt", "second prompt"):
        store.add_prompt([{"role": "user", "content": p}])
    boss = client_for(create_app(store, models=["tiny-random-llama", "tiny-random-gpt2"], max_new_tokens=5), "boss")
    token = csrf_of(boss.get("/admin").text)
    r = boss.post("/admin/generate", data={"csrf": token, "k": "3"})
    assert r.headers["location"].endswith("generated=2")
    with store.session() as s:
        items = list(s.scalars(select(Item)))
        assert [(i.kind, i.k) for i in items] == [("compare", 3), ("compare", 3)]
        models = {(s.get(Reply, i.reply_a_id).model, s.get(Reply, i.reply_b_id).model) for i in items}
    assert models == {("tiny-random-llama", "tiny-random-gpt2")}
    assert boss.post("/admin/generate", data={"csrf": token}).headers["location"].endswith("generated=0")
    no_model = client_for(create_app(store), "boss")
    assert no_model.post("/admin/generate", data={"csrf": csrf_of(no_model.get("/admin").text)}).status_code == 404


def test_admin_switches_a_user_off_and_changes_roles(app_store):
    app, store = app_store
    boss, ann = client_for(app, "boss"), client_for(app, "ann")
    assert ann.get("/next").status_code == 303
    ids = {u.name: u.id for u in store.users()}
    token = csrf_of(boss.get("/admin").text)
    assert boss.post(f"/admin/users/{ids['ann']}", data={"csrf": token, "action": "deactivate"}).status_code == 303
    assert ann.get("/next").headers["location"] == "/login"  # the open session is refused at once
    assert login(client_for(app), "ann").status_code == 401  # and no new one
    boss.post(f"/admin/users/{ids['ann']}", data={"csrf": token, "action": "activate"})
    boss.post(f"/admin/users/{ids['vic']}", data={"csrf": token, "action": "role", "role": "annotator"})
    assert client_for(app, "vic").get("/next").status_code == 303  # viewer promoted to annotator
    assert boss.post(f"/admin/users/{ids['boss']}", data={"csrf": token, "action": "deactivate"}).status_code == 409
    assert boss.post(f"/admin/users/{ids['vic']}", data={"csrf": token, "action": "role", "role": "root"}).status_code == 400
    assert boss.post(f"/admin/users/{ids['vic']}", data={"csrf": token, "action": "explode"}).status_code == 400
    assert boss.post("/admin/users/999", data={"csrf": token, "action": "activate"}).status_code == 404
    assert boss.post(f"/admin/users/{ids['vic']}", data={"action": "deactivate"}).status_code == 403  # no CSRF
    assert ann.post(f"/admin/users/{ids['vic']}", data={"csrf": token, "action": "deactivate"}).status_code in (401, 403)


def test_two_worker_processes_serve_log_ins_and_answers_and_warn_about_sqlite(tmp_path):
    """`serve --workers 2`: real uvicorn worker processes built by `app.from_env` (sharing one session secret)
    take a log-in and eight lease-and-answer rounds on fresh connections; SQLite's single writer is called out."""
    import httpx

    store = Store(str(tmp_path / "fb.db"))
    store.add_user("ann", "correct horse")
    for i in range(8):
        pid = store.add_prompt([{"role": "user", "content": f"prompt {i}"}])
        store.add_item("rate", store.add_reply(pid, f"reply {i}"))
    with feedback_app(tmp_path / "fb.db", "--workers", "2") as app:
        url = app["url"]
        login = httpx.post(url + "/api/login", json={"name": "ann", "password": "correct horse"})
        cookie, csrf = login.cookies, login.json()["csrf"]
        answered = set()
        for _ in range(8):  # fresh connections, each accepted by whichever worker is free
            with httpx.Client(base_url=url, cookies=cookie) as c:
                (item,) = c.get("/api/next").json()["items"]
                r = c.post(f"/api/items/{item['id']}", json={"score": 4}, headers={"X-CSRF-Token": csrf})
                assert r.status_code == 201, r.text
                answered.add(item["id"])
        assert len(answered) == 8 and store.progress() == {"answers": 8, "needed": 8}
    err = app["err"]
    assert "SQLite lets one process write at a time" in err and "postgresql" in err


def test_a_log_in_does_not_hold_up_other_requests(app_store, monkeypatch):
    """A password check is ~0.1 s of argon2: it runs in a worker thread, so a log-in never stalls the
    annotators already at work (a real uvicorn server; the check made slow to make the overlap certain)."""
    import threading
    import time

    import httpx
    import uvicorn

    import chatrlhf.feedback.store as store_module

    app, _ = app_store
    check = store_module.check_password
    monkeypatch.setattr(store_module, "check_password", lambda h, p: time.sleep(1.0) or check(h, p))
    server = uvicorn.Server(uvicorn.Config(app, port=free_port(), log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    deadline = time.monotonic() + 10
    while not server.started and serving.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the test server did not start"
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        with httpx.Client(base_url=url) as ann:
            assert ann.post("/api/login", json={"name": "ann", "password": "correct horse"}).status_code == 200
            slow = threading.Thread(target=lambda: httpx.post(url + "/api/login",
                                                              json={"name": "bob", "password": "correct horse"}))
            slow.start()
            time.sleep(0.2)  # bob's password is being checked
            t = time.perf_counter()
            assert ann.get("/api/next").status_code == 200
            assert time.perf_counter() - t < 0.5 and slow.is_alive()  # answered while bob's log-in still ran
            slow.join()
    finally:
        server.should_exit = True
        serving.join(timeout=10)


def test_the_json_api_leases_and_stores_answers_on_both_databases(store):
    """On PostgreSQL the store calls run in worker threads (on SQLite inline): the same answers either way."""
    store.add_user("ann", "correct horse")
    pid = store.add_prompt([{"role": "user", "content": "Which?"}])
    items = [store.add_item("compare", store.add_reply(pid, "A"), store.add_reply(pid, "B")) for _ in range(3)]
    api = TestClient(create_app(store))
    token = api.post("/api/login", json={"name": "ann", "password": "correct horse"}).json()["csrf"]
    leased = [x["id"] for x in api.get("/api/next?count=5").json()["items"]]
    assert leased == items
    for i, choice in zip(leased, ("a", "b", "tie")):
        assert api.post(f"/api/items/{i}", json={"choice": choice}, headers={"x-csrf-token": token}).status_code == 201
    assert api.get("/api/next?count=5").json() == {"items": []}
    with store.session() as s:
        stored = sorted(s.execute(select(Comparison.item_id, Comparison.choice)).all())
    assert stored == [(items[0], "a"), (items[1], "b"), (items[2], "tie")]
