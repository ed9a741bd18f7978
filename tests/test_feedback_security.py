"""Regression tests for the attack on the feedback app (issue 17), one per finding, plus a property-based attack on
every JSON route as each role: no 500s, and nothing stored from a rejected request."""

import json
import statistics
import threading
import time

import pytest
from conftest import run_cli
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from chatrlhf.feedback.app import create_app
from chatrlhf.feedback.security import DEVICE_COOKIE, LoginLimiter
from chatrlhf.feedback.store import Comparison, Correction, FeedbackError, Item, Prompt, Rating, Reply, Store
from test_feedback_app import client_for, csrf_of, login

JSON = {"content-type": "application/json"}


@pytest.fixture
def app_store(tmp_path):
    store = Store(str(tmp_path / "fb.db"))
    store.add_user("boss", "correct horse", "admin")
    store.add_user("ann", "correct horse")
    store.add_user("vic", "correct horse", "viewer")
    for i in range(3):
        pid = store.add_prompt([{"role": "user", "content": f"prompt {i}"}])
        store.add_item("compare", store.add_reply(pid, f"A{i}"), store.add_reply(pid, f"B{i}"))
    pid = store.add_prompt([{"role": "user", "content": "rate me"}])
    store.add_item("rate", store.add_reply(pid, "a reply"))
    pid = store.add_prompt([{"role": "user", "content": "correct me"}])
    store.add_item("correct", store.add_reply(pid, "a reply"))
    return create_app(store), store


def api_login(c, name, password="correct horse", **kw):
    return c.post("/api/login", json={"name": name, "password": password}, **kw)


def rows(store) -> dict:
    with store.session() as s:
        return {t.__name__: s.scalar(select(func.count()).select_from(t))
                for t in (Prompt, Reply, Item, Rating, Comparison, Correction)}


# 1, 9 ----------------------------------------------------------------------- one limiter on every log-in route


def test_api_login_is_limited_like_the_form_and_both_count_together(app_store):
    app, _ = app_store
    c = TestClient(app)
    for _ in range(3):
        assert login(c, "ann", "wrong password").status_code == 401
    for _ in range(2):
        assert api_login(c, "ann", "wrong password").status_code == 401
    assert api_login(c, "ann").status_code == 429  # the 6th try, right password or not, waits
    assert login(c, "ann").status_code == 429


def test_others_guessing_cannot_lock_out_a_browser_that_logged_in_before(app_store):
    app, _ = app_store
    user = TestClient(app)
    assert api_login(user, "ann").status_code == 200 and user.cookies.get(DEVICE_COOKIE)
    attacker = TestClient(app)  # same address, no device cookie
    for _ in range(5):
        api_login(attacker, "ann", "guess")
    assert api_login(attacker, "ann").status_code == 429
    assert api_login(user, "ann").status_code == 200  # the real user's browser still gets in


def test_the_limiter_forgets_and_stays_bounded_and_has_a_global_cap():
    lim = LoginLimiter(per_name=2, window=0.05, global_cap=1000, max_names=100)
    for i in range(500):
        lim.failed(f"name{i}", False)
    assert len(lim.failures) <= 100
    time.sleep(0.06)
    lim.failed("x", False)
    assert len(lim.failures) == 1  # names whose failures are older than the window are forgotten
    cap = LoginLimiter(global_cap=3)
    for name in "abc":
        cap.failed(name, False)
    with pytest.raises(FeedbackError, match="on this server"):
        cap.check("d", True)


# 2 ---------------------------------------------------------------------------- logout ends every session


def test_logout_and_switch_off_end_every_session_for_good(app_store):
    app, store = app_store
    a, b = TestClient(app), TestClient(app)
    token = api_login(a, "ann").json()["csrf"]
    api_login(b, "ann")
    copied = dict(a.cookies)
    assert a.post("/api/logout", headers={"x-csrf-token": token, **JSON}).status_code == 200
    for c in (TestClient(app, cookies=copied), b):  # a copied cookie and the other browser: both ended
        assert c.get("/api/session").status_code == 401
    c = TestClient(app)
    api_login(c, "ann")
    copied = dict(c.cookies)
    ann = next(u for u in store.users() if u.name == "ann")
    boss = client_for(app, "boss")
    token = csrf_of(boss.get("/admin").text)
    for action in ("deactivate", "activate"):
        assert boss.post(f"/admin/users/{ann.id}", data={"csrf": token, "action": action}).status_code == 303
    assert TestClient(app, cookies=copied).get("/api/session").status_code == 401  # switched on again: still ended


# 3 ---------------------------------------------------------------------------- log-in timing tells nothing


def test_log_in_takes_as_long_for_an_unknown_name(app_store):
    _, store = app_store

    def timed(name):
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert store.authenticate(name, "wrong password") is None
            t.append(time.perf_counter() - t0)
        return statistics.median(t)

    known, unknown = timed("ann"), timed("nobody-by-this-name")
    assert unknown > 0.5 * known and known > 0.02  # both pay for one argon2 check (was 0.004 s against 0.22 s)


# 4 ---------------------------------------------------------------------------- no 500s


def test_hostile_numbers_and_nesting_are_400s_not_500s(app_store):
    app, _ = app_store
    boss = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    token = api_login(boss, "boss").json()["csrf"]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert boss.get("/item/99999999999999999999").status_code == 400
    assert boss.post("/api/items/99999999999999999999", json={"choice": "a"},
                     headers={"x-csrf-token": token}).status_code == 400
    assert TestClient(app, raise_server_exceptions=False).post("/api/login", content=deep, headers=JSON).status_code == 400
    assert boss.post("/api/items/1", content=b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
                     headers={"x-csrf-token": token, **JSON}).status_code == 400
    for field in ("k", "round"):
        r = boss.post("/admin/import", data={"csrf": token, "records": '{"prompt": "p", "response": "r", "score": 3}',
                                             field: "9" * 40})
        assert r.status_code == 400 and f"{field} must be a whole number" in r.text
    for bad in ("nan", "inf", "-1", "1.5"):
        assert boss.get(f"/admin/export.zip?eval_fraction={bad}").status_code == 400
    assert boss.get("/admin/export.zip?rule=bogus").status_code == 400


# 5 ---------------------------------------------------------------------------- imports are one transaction


def test_a_failed_web_import_leaves_nothing(app_store, monkeypatch):
    app, store = app_store
    boss = TestClient(app, follow_redirects=False)
    token = api_login(boss, "boss").json()["csrf"]
    before = rows(store)
    calls = {"n": 0}
    real = store.add_item

    def fails_second_time(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FeedbackError("disk full (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(store, "add_item", fails_second_time)
    records = "".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(3))
    r = boss.post("/admin/import", data={"csrf": token, "records": records})
    assert r.status_code == 400 and rows(store) == before


# 6 ---------------------------------------------------------------------------- the CLI export


def test_export_is_swapped_in_whole_while_readers_read(tmp_path, app_store):
    from chatrlhf.feedback.export import export

    _, store = app_store
    out = tmp_path / "out"
    export(store, out)
    (tmp_path / "out.old").mkdir()  # a leftover of the old scheme: no longer in the way
    missing, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if not (out / "manifest.json").is_file():
                missing.append(time.perf_counter())

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(15):
        export(store, out)
    stop.set()
    t.join()
    assert missing == [] and not list(tmp_path.glob(".export-*")) and not list(tmp_path.glob(".out.old-*"))


def test_export_flags_are_checked_and_a_failed_export_leaves_no_temp_folder(tmp_path, app_store, monkeypatch):
    from chatrlhf.feedback import export as export_module

    _, store = app_store
    db = store.url.removeprefix("sqlite:///")
    for bad in ("nan", "1.5", "-1", "inf"):
        r = run_cli("feedback", "export", "--db", db, "--output-dir", tmp_path / "e", "--eval-fraction", bad)
        assert r.returncode == 2 and "--eval-fraction" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    r = run_cli("feedback", "export", "--db", db, "--output-dir", tmp_path / "notes")
    assert r.returncode == 2 and (tmp_path / "notes" / "mine.txt").read_text() == "keep me"  # not an export: kept

    def broken(*a, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_module, "_write", broken)
    with pytest.raises(OSError):
        export_module.export(store, tmp_path / "x")
    assert not list(tmp_path.glob(".export-*")) and not (tmp_path / "x").exists()


# 7, 8 ------------------------------------------------------------------------- login CSRF, headers


def test_json_log_in_only_as_json_from_this_origin(app_store):
    app, _ = app_store
    c = TestClient(app)
    body = json.dumps({"name": "ann", "password": "correct horse"})
    r = c.post("/api/login", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "set-cookie" not in r.headers
    r = c.post("/api/login", content=body, headers={**JSON, "origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert c.post("/api/login", content=body, headers={**JSON, "origin": "http://testserver"}).status_code == 200


def test_security_headers_on_every_response(app_store, tmp_path):
    app, store = app_store
    boss = client_for(app, "boss")
    for path in ("/login", "/admin", "/admin/export.zip", "/nope"):
        h = boss.get(path).headers
        assert "script-src 'nonce-" in h["content-security-policy"] and "frame-ancestors 'none'" in \
            h["content-security-policy"]
        assert (h["x-frame-options"], h["x-content-type-options"], h["referrer-policy"], h["cache-control"]) == \
            ("DENY", "nosniff", "no-referrer", "no-store")
        assert "strict-transport-security" not in h
    page = boss.get("/login")
    nonce = page.headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    assert nonce != boss.get("/login").headers["content-security-policy"].split("'nonce-")[1].split("'")[0]
    prod = TestClient(create_app(store, secret="s" * 43, production=True), base_url="https://testserver")
    assert prod.get("/login").headers["strict-transport-security"].startswith("max-age=")


# 10, 11 ----------------------------------------------------------------------- typed input, smaller findings


def test_wrong_typed_answers_are_400_and_store_nothing(app_store):
    app, store = app_store
    ann = TestClient(app, follow_redirects=False)
    token = api_login(ann, "ann").json()["csrf"]
    items = ann.get("/api/next?count=10").json()["items"]
    correct = next(i["id"] for i in items if i["kind"] == "correct")
    before = rows(store)
    h = {"x-csrf-token": token}
    for body in ({"corrected": ["x"], "reason": {"a": 1}}, {"corrected": "ok", "reason": ["r"]}, {"corrected": 5},
                 {"score": True}, {"thumbs": True}, {"choice": 1}, {"extra": "field", "corrected": "x"}):
        assert ann.post(f"/api/items/{correct}", json=body, headers=h).status_code == 400, body
    form = ann.post(f"/item/{correct}", data={"csrf": token}, files={"corrected": ("x.txt", b"file body")})
    assert form.status_code == 400 and rows(store) == before


def test_an_invalid_answer_to_an_answered_item_is_a_400_and_ids_are_ints(app_store):
    app, store = app_store
    ann = TestClient(app)
    token = api_login(ann, "ann").json()["csrf"]
    items = {i["kind"]: i["id"] for i in ann.get("/api/next?count=10").json()["items"]}
    h = {"x-csrf-token": token}
    first = ann.post(f"/api/items/{items['rate']}", json={"score": 4}, headers=h)
    assert first.status_code == 201 and type(first.json()["answer"]) is int
    assert ann.post(f"/api/items/{items['rate']}", json={"score": 9}, headers=h).status_code == 400
    ann_id = next(u.id for u in store.users() if u.name == "ann")
    with pytest.raises(FeedbackError, match="out of range") as e:  # the store checks before "already answered"
        store.submit(ann_id, items["rate"], score=9)
    assert e.value.status == 400


def test_web_import_is_as_strict_as_the_cli(app_store):
    app, store = app_store
    boss = TestClient(app, follow_redirects=False)
    token = api_login(boss, "boss").json()["csrf"]
    good = b'{"prompt": "p", "response": "r", "score": 3}\n'
    r = boss.post("/admin/import", data={"csrf": token}, files={"records": ("x.jsonl", b"\xff\xfe" + good)})
    assert r.status_code == 400 and "UTF-8" in r.text
    for field, value in (("kind", "bogus"), ("round", "-5")):
        assert boss.post("/admin/import", data={"csrf": token, "records": good.decode(), field: value}).status_code == 400
    assert boss.post("/admin/import", data={"csrf": token}, files={"records": ("mine.jsonl", good)}).status_code == 303
    with store.session() as s:
        sources = set(s.scalars(select(Prompt.source)))
    assert "web import: mine.jsonl" in sources and not any("/tmp" in x or "import.jsonl" in x for x in sources)


def test_production_needs_a_long_secret_and_user_names_must_be_printable(tmp_path):
    store = Store(str(tmp_path / "fb.db"))
    store.add_user("boss", "correct horse", "admin")
    for short in ("s", "x" * 31):
        with pytest.raises(FeedbackError, match="at least 32"):
            create_app(store, secret=short, production=True)
    assert create_app(store, secret="x" * 32, production=True)
    for name in ("ann\x00", "ad\u202emin", "zero\u200bwidth", "two\nlines"):
        with pytest.raises(FeedbackError, match="not allowed"):
            store.add_user(name, "correct horse")


# ----------------------------------------------------------------------------- property-based attack on the API

FIELDS = ["name", "password", "score", "thumbs", "choice", "confidence", "corrected", "reason"]
values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                      max_leaves=8)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values, max_size=4) | values
ids = st.integers(min_value=-2**70, max_value=2**70) | st.sampled_from([1, 2, 3, 4, 5])


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    store = Store(str(tmp_path_factory.mktemp("fuzz") / "fb.db"))
    for name, role in (("boss", "admin"), ("ann", "annotator"), ("vic", "viewer")):
        store.add_user(name, "correct horse", role)
    for kind in ("compare", "rate", "correct"):
        pid = store.add_prompt([{"role": "user", "content": kind}])
        store.add_item(kind, store.add_reply(pid, "a"), store.add_reply(pid, "b") if kind == "compare" else None, k=3)
    app = create_app(store)
    clients = {None: TestClient(app, raise_server_exceptions=False)}
    for name in ("boss", "ann", "vic"):
        c = TestClient(app, raise_server_exceptions=False)
        c.headers["x-csrf-token"] = api_login(c, name).json()["csrf"]
        clients[name] = c
    clients["ann"].get("/api/next?count=10")  # ann holds every item
    return store, clients


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(role=st.sampled_from([None, "boss", "ann", "vic"]), item=ids, body=bodies,
       route=st.sampled_from(["submit", "login", "next", "session"]),
       raw=st.sampled_from([None, b"{", b"\xff", b"[" * 5000]), count=st.text(max_size=6) | st.integers().map(str))
def test_no_json_route_answers_500_and_rejected_requests_store_nothing(fuzz_target, role, item, body, route, raw, count):
    store, clients = fuzz_target
    c = clients[role]
    before = rows(store)
    content = raw if raw is not None else json.dumps(body).encode()
    if route == "submit":
        r = c.post(f"/api/items/{item}", content=content, headers=JSON)
    elif route == "login":
        r = c.post("/api/login", content=content, headers=JSON)
        if r.status_code == 200:  # a fuzzed log-in never succeeds (no fuzzed password is right)
            pytest.fail(f"logged in with {body!r}")
    elif route == "next":
        r = c.get("/api/next", params={"count": count, "kind": count})
    else:
        r = c.get("/api/session")
    assert r.status_code < 500, (route, role, body, r.text)
    if r.status_code >= 400:
        assert rows(store) == before, (route, role, body, r.status_code)
    assert r.headers["content-type"].startswith("application/json")
