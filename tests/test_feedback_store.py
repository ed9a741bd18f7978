"""The feedback store on SQLite and on a real PostgreSQL server: schema by Alembic, users, exactly-k
assignment under concurrent submits, bad input, and injection strings stored as text."""

import datetime as dt
import threading

import pytest
from sqlalchemy import func, inspect, select

from chatrlhf.feedback.migrations import current
from chatrlhf.feedback.quality import krippendorff_alpha
from chatrlhf.feedback.store import Comparison, FeedbackError, Item, Rating, Reply, User


def users(store, n, role="annotator"):
    return [store.add_user(f"u{i}", "correct horse", role).id for i in range(n)]


def compare_item(store, k=1, prompt="Which is better?", gold=None):
    pid = store.add_prompt([{"role": "user", "content": prompt}])
    a, b = store.add_reply(pid, "reply A"), store.add_reply(pid, "reply B")
    return store.add_item("compare", a, b, k=k, gold=gold)


def test_schema_is_made_by_alembic_and_upgrade_is_idempotent(store):
    assert current(store.engine) == "0005"
    tables = set(inspect(store.engine).get_table_names())
    assert {"users", "prompts", "replies", "items", "assignments", "ratings", "comparisons", "corrections",
            "events", "alembic_version"} <= tables
    store.upgrade()
    assert current(store.engine) == "0005"


def test_migrating_a_0001_database_keeps_its_answers_and_marks_filled_items(tmp_path):
    from chatrlhf.feedback.migrations import upgrade
    from chatrlhf.feedback.store import Store

    old = Store(str(tmp_path / "old.db"), upgrade=False)
    upgrade(old.engine, "0001")
    with old.engine.begin() as c:  # a 0001 database with one answered item and one open one
        c.exec_driver_sql("INSERT INTO users (id, name, password_hash, role, active, created_at) "
                          "VALUES (1, 'u', 'x', 'annotator', 1, '2026-01-01')")
        c.exec_driver_sql("INSERT INTO prompts (id, messages, source, round, created_at) VALUES (1, '[]', '', 0, '2026-01-01')")
        c.exec_driver_sql("INSERT INTO replies (id, prompt_id, text, model, checkpoint, decoding, template, round, "
                          "created_at) VALUES (1, 1, 'r', '', '', '{}', '', 0, '2026-01-01')")
        for i in (1, 2):
            c.exec_driver_sql(f"INSERT INTO items (id, kind, prompt_id, reply_a_id, k, round, created_at) "
                              f"VALUES ({i}, 'rate', 1, 1, 1, 0, '2026-01-01')")
        c.exec_driver_sql("INSERT INTO assignments (item_id, user_id, leased_at, expires_at, done) "
                          "VALUES (1, 1, '2026-01-01', '2026-01-01', 1)")
    store = Store(str(tmp_path / "old.db"))
    assert current(store.engine) == "0005"
    with store.session() as s:
        assert [(i.id, i.filled, i.held_until) for i in s.scalars(select(Item).order_by(Item.id))] == \
            [(1, True, None), (2, False, None)]
        reply = s.get(Reply, 1)   # 0005: the served-completion columns, empty for a reply from before
        assert (reply.text, reply.completion_id, reply.choice_index, reply.finish_reason) == ("r", None, None, None)


def test_users_passwords_are_hashed_and_checked(store):
    store.add_user("ann", "correct horse", "annotator")
    with store.session() as s:
        stored = s.scalar(select(User.password_hash))
    assert stored.startswith("$argon2") and "correct horse" not in stored
    assert store.authenticate("ann", "correct horse").name == "ann"
    assert store.authenticate("ann", "wrong horse") is None
    assert store.authenticate("nobody", "correct horse") is None
    with pytest.raises(FeedbackError) as e:
        store.add_user("ann", "another one", "annotator")
    assert e.value.status == 409
    for bad in (("bob", "short", "annotator"), ("bob", "long enough", "root")):
        with pytest.raises(FeedbackError):
            store.add_user(*bad)


def test_each_item_gets_exactly_k_answers_and_double_submits_are_not_duplicated(store):
    a, b, c = users(store, 3)
    item = compare_item(store, k=2)
    assert store.lease(a) == item and store.lease(b) == item
    assert store.lease(c) is None  # two live leases fill k = 2
    first = store.submit(a, item, choice="a")
    assert first[1] and store.submit(a, item, choice="b") == (first[0], False)  # double submit: the first stands
    store.submit(b, item, choice="tie")
    assert store.lease(c) is None
    with pytest.raises(FeedbackError) as e:
        store.submit(c, item, choice="a")  # never leased it
    assert e.value.status == 404  # not yours: the same answer as for an id that does not exist
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 2
        assert s.scalar(select(Comparison.choice).where(Comparison.user_id == a)) == "a"
    assert store.progress() == {"answers": 2, "needed": 2} and store.progress(a)["answers"] == 1


def test_an_expired_lease_frees_the_item_and_a_late_answer_is_refused(store):
    a, b = users(store, 2)
    item = compare_item(store, k=1)
    assert store.lease(a, seconds=0) == item  # expires at once
    assert store.lease(b) == item
    store.submit(b, item, choice="b")
    with pytest.raises(FeedbackError) as e:
        store.submit(a, item, choice="a")
    assert e.value.status == 409


def test_the_submit_binds_times_as_sqlalchemy_stores_them(store, monkeypatch):
    """The submit runs compiled statements on the DB-API cursor; SQLite compares stored times as text, so a
    bound time must have SQLAlchemy's stored format ('… 12:00:00.000000', not Python's '… 12:00:00')."""
    t = dt.datetime(2026, 1, 1, 12, 0, 0)  # no microseconds: the two formats differ
    monkeypatch.setattr("chatrlhf.feedback.store.now", lambda: t)
    a, b = users(store, 2)
    item = compare_item(store, k=1)
    assert store.lease(a, seconds=0) == item  # a's lease ends at t: no longer live at t
    assert store.lease(b) == item
    answer, created = store.submit(b, item, choice="b")  # a 409 if a's lease still looked live
    assert created
    with store.session() as s:
        assert s.get(Comparison, answer).created_at == t


def test_concurrent_annotators_never_exceed_k(store):
    n_users, n_items, k = 6, 10, 2
    ids = users(store, n_users)
    items = [compare_item(store, k=k, prompt=f"prompt {i}") for i in range(n_items)]
    errors = []

    def annotate(uid):
        try:
            while batch := store.lease_many(uid, 3):  # batches of leases race each other too
                for item in batch:
                    store.submit(uid, item, choice="a")
                    store.submit(uid, item, choice="a")  # and a double submit
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=annotate, args=(u,)) for u in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    with store.session() as s:
        per_item = dict(s.execute(select(Comparison.item_id, func.count()).group_by(Comparison.item_id)).all())
        pairs = s.execute(select(Comparison.item_id, Comparison.user_id)).all()
    assert per_item == {i: k for i in items}
    assert len(pairs) == len(set(pairs)) == n_items * k


def test_bad_answers_get_clear_4xx_errors(store):
    (a,) = users(store, 1)
    pid = store.add_prompt([{"role": "user", "content": "hi"}])
    rate = store.add_item("rate", store.add_reply(pid, "hello"))
    store.lease(a)
    for bad, status in (({"score": 6}, 400), ({"score": "5"}, 400), ({"thumbs": 2}, 400), ({}, 400)):
        with pytest.raises(FeedbackError) as e:
            store.submit(a, rate, **bad)
        assert e.value.status == status, bad
    with pytest.raises(FeedbackError) as e:
        store.submit(a, 999, score=3)
    assert e.value.status == 404
    with pytest.raises(FeedbackError):
        store.add_item("compare", 1)  # one reply for a comparison
    assert store.submit(a, rate, score=4, thumbs=1)[1]
    with store.session() as s:
        assert s.scalar(select(Rating.score)) == 4


def test_sql_injection_strings_are_stored_as_text(store):
    evil = "x'); DROP TABLE users; --"
    pid = store.add_prompt([{"role": "user", "content": evil}])
    store.add_user("o'brien; --", "correct horse")
    assert store.authenticate("o'brien; --", "correct horse") is not None
    with store.session() as s:
        from chatrlhf.feedback.store import Prompt

        assert s.get(Prompt, pid).messages[0]["content"] == evil
    assert "users" in inspect(store.engine).get_table_names()


def test_krippendorff_alpha_hand_computed():
    # 4 units, 2 coders: (1,1) (2,2) (1,2) (2,1) → o11 = o22 = o12 = o21 = 2, n1 = n2 = 4, n = 8:
    # α = 1 − (n − 1)·Σ_{c≠k} o_ck / Σ_{c≠k} n_c·n_k = 1 − 7·4/32 = 0.125
    assert krippendorff_alpha([[1, 1], [2, 2], [1, 2], [2, 1]]) == pytest.approx(0.125)
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"], ["a"]]) == pytest.approx(1.0)
    # interval: units (1,2) (3,3): o12 = o21 = 1, o33 = 2; n1 = n2 = 1, n3 = 2, n = 4
    # Σ o·δ = 2·1 = 2; Σ n_c n_k δ = 2·(1·1·1 + 1·2·4 + 1·2·1) = 22 → α = 1 − 3·2/22
    assert krippendorff_alpha([[1, 2], [3, 3]], "interval") == pytest.approx(1 - 6 / 22)
    assert krippendorff_alpha([[1, 1]]) is None  # one category: undefined


def test_an_item_stays_open_until_it_has_k_answers_not_k_leases(store):
    a, b, c = users(store, 3)
    item = compare_item(store, k=2)
    assert store.lease(a) == item and store.lease(b, seconds=0) == item  # b's lease lapses unanswered
    store.submit(a, item, choice="a")
    assert store.lease(c) == item  # one answer of two: still open
    store.submit(c, item, choice="b")
    assert store.lease(b) is None


def test_items_others_hold_are_skipped_by_their_hint_and_freed_by_a_skip_or_expiry(store, monkeypatch):
    t = dt.datetime(2026, 1, 1, 12, 0, 0, 500)
    monkeypatch.setattr("chatrlhf.feedback.store.now", lambda: t)
    a, b, c = users(store, 3)
    one, two = compare_item(store, k=1, prompt="one"), compare_item(store, k=2, prompt="two")
    assert store.lease_many(a, 2) == [one, two]
    with store.session() as s:  # the lease filled `one` (k = 1) until it ends; `two` still has a free place
        assert [s.get(Item, i).held_until for i in (one, two)] == [t + dt.timedelta(seconds=600), None]
    assert store.lease_many(b, 2) == [two]
    with store.session() as s:
        assert s.get(Item, two).held_until == t + dt.timedelta(seconds=600)
    assert store.lease_many(c, 2) == []
    store.skip(a, one)  # given back: free at once, not in ten minutes
    assert store.lease_many(c, 2) == [one]
    monkeypatch.setattr("chatrlhf.feedback.store.now", lambda: t + dt.timedelta(seconds=600))
    d = store.add_user("d", "correct horse").id
    assert store.lease_many(a, 2) == []  # a held both: never offered to a again
    assert store.lease_many(d, 2) == [one, two]  # every lease ended now (its hint is now): both free


def test_lease_many_gives_held_items_first_then_the_oldest_open_ones_of_the_kind(store):
    a, b = users(store, 2)
    items = [compare_item(store, prompt=f"prompt {i}") for i in range(5)]
    pid = store.add_prompt([{"role": "user", "content": "rate me"}])
    rate = store.add_item("rate", store.add_reply(pid, "a reply"))
    assert store.lease_many(a, 2) == items[:2]
    assert store.lease_many(b, 2) == items[2:4]  # a's live leases take items 0 and 1 (k = 1)
    assert store.lease_many(a, 3) == items[:2] + [items[4]]  # held first, then the next open one
    assert store.lease_many(b, 10, kind="rate") == [rate]  # not b's held compare items
    assert store.lease_many(a, 10, kind="rate") == []
    assert store.lease_many(a, 10**6) == items[:2] + [items[4]]  # the count is capped, nothing more is open
    views = store.item_views(items[:2], a, "annotator")
    assert [v["id"] for v in views] == items[:2] and views[0]["messages"][0]["content"] == "prompt 0"
    assert (views[0]["a"], views[0]["b"]) == ("reply A", "reply B")
    with pytest.raises(FeedbackError) as e:
        store.item_views(items[:3], a, "annotator")  # item 2 is b's
    assert e.value.status == 404  # not yours: the same answer as for an id that does not exist


def test_the_background_checkpointer_moves_the_log_into_the_database_file(tmp_path):
    import time

    from chatrlhf.feedback.store import Store

    store = Store(str(tmp_path / "f.db"))
    db = tmp_path / "f.db"
    with store.checkpointing(every=0.05):
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0  # commits no longer do it
        size = db.stat().st_size
        for i in range(20):
            store.add_prompt([{"role": "user", "content": "x" * 20000 + str(i)}])  # ~100 pages into the log
        assert db.stat().st_size == size  # still only in the log
        deadline = time.monotonic() + 10
        while db.stat().st_size == size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.stat().st_size > size + 300_000  # copied by the thread
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000  # back to SQLite's default


def test_serving_starts_from_an_empty_write_ahead_log(tmp_path):
    import sqlite3

    from chatrlhf.feedback.store import Store

    store = Store(str(tmp_path / "f.db"))
    held = sqlite3.connect(tmp_path / "f.db")  # an open connection keeps the log from being removed on close
    held.execute("select count(*) from users").fetchall()
    for i in range(10):
        store.add_prompt([{"role": "user", "content": "x" * 20000 + str(i)}])
    assert (tmp_path / "f.db-wal").stat().st_size > 200_000  # a bulk import's log
    with store.checkpointing(every=60):
        assert (tmp_path / "f.db-wal").stat().st_size == 0  # copied and emptied before serving
        assert len(store.users()) == 0 and held.execute("select count(*) from prompts").fetchone() == (10,)
    held.close()


def test_a_long_read_on_sqlite_neither_holds_up_writes_nor_sees_them(tmp_path):
    """Store.reading() begins deferred on SQLite: an export or the agreement statistics read a snapshot while
    submits go on (a write transaction — BEGIN IMMEDIATE — would make every writer wait for the read)."""
    from chatrlhf.feedback.store import Prompt, Store

    store = Store(str(tmp_path / "fb.db"))
    store.add_prompt([{"role": "user", "content": "first"}])
    with store.reading() as s:
        assert s.scalar(select(func.count()).select_from(Prompt)) == 1  # the snapshot starts here
        writer = threading.Thread(target=store.add_prompt, args=([{"role": "user", "content": "second"}],))
        writer.start()
        writer.join(timeout=5)
        assert not writer.is_alive()  # committed while the read was open
        assert s.scalar(select(func.count()).select_from(Prompt)) == 1  # still the snapshot
    with store.reading() as s:
        assert s.scalar(select(func.count()).select_from(Prompt)) == 2
    store.engine.dispose()


def test_a_double_submit_that_slips_past_the_count_returns_the_first_answer(store, monkeypatch):
    """The unique (item, annotator) constraint is the last guard: if a concurrent double submit were not seen by
    the count (made blind here), the insert fails and the first answer is returned — nothing stored twice."""
    (a,) = users(store, 1)
    item = compare_item(store, k=2)
    store.lease(a)
    first, created = store.submit(a, item, choice="a")
    compiled = type(store)._compiled

    def blind(self, name, cur, params):
        out = compiled(self, name, cur, params)
        if name.startswith("counts_"):  # the count misses the first answer
            row = out.fetchone()
            return type("Row", (), {"fetchone": lambda _: (None, row[1], row[2], row[3])})()
        return out

    monkeypatch.setattr(type(store), "_compiled", blind)
    assert store.submit(a, item, choice="b") == (first, False)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Comparison)) == 1
        assert s.scalar(select(Comparison.choice)) == "a"
