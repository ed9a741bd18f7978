"""The human feedback store: the operations the web app and the exporter use, on the tables of tables.py.

SQLite (a file, WAL journal) by default; PostgreSQL by URL (``postgresql+psycopg://…``). The schema is
created and upgraded by Alembic (``feedback/migrations``), never by ``create_all``.

Exactness: every item is answered by exactly ``k`` annotators. A submit runs in one write transaction
that first locks the item (``SELECT … FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite, which
serialises writers), counts its answers and the live leases of other annotators, and refuses a
(k+1)-th answer. A unique (item, annotator) constraint makes a double submit return the first answer
instead of storing a second one.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import hashlib
from contextlib import closing, contextmanager
from pathlib import Path

from sqlalchemy import DateTime, bindparam, case, create_engine, event, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from chatrlhf.feedback import migrations
from chatrlhf.feedback.errors import Conflict, FeedbackError, Invalid, NotFound  # noqa: F401 - callers catch it here
from chatrlhf.feedback.tables import ANSWERS, CHOICES, KINDS, ROLES, Assignment, Base, Comparison, Correction, \
    Event, Item, Prompt, Rating, Reply, User, now  # noqa: F401 - the store's callers take the tables from here

def database_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL as given, or a file path for SQLite."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


def engine_for(url: str):
    if not url.startswith("sqlite"):
        # a fixed pool: overflow connections are closed when returned, and opening one costs a server process
        # (the app's worker threads queue for a connection instead — paced load 378 → 511 submissions/s)
        return create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=0)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(conn, _):
        conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = conn.cursor()
        if not url.endswith(":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable once committed, fsync at checkpoints
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # writers queue here instead of failing mid-transaction; readers (Store.reading) take a
        # snapshot and neither wait for the writer nor hold it up
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("reading") else "BEGIN IMMEDIATE")

    return engine


def hash_password(password: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


_DUMMY_HASH: list[str] = []


def dummy_hash() -> str:
    """A hash of a random password, checked for unknown names so that a log-in takes as long either way."""
    if not _DUMMY_HASH:
        import secrets

        _DUMMY_HASH.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY_HASH[0]


def check_name(name: str) -> str:
    """A user name as stored: 1–64 printable characters — no control, format (bidi overrides, zero-width) or
    line-separator characters, which would make one name look like another."""
    import unicodedata

    name = name.strip()
    if not name or len(name) > 64:
        raise Invalid("user name: 1–64 characters")
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")]
    if bad:
        raise Invalid(f"user name: character U+{ord(bad[0]):04X} is not allowed",
                            "use letters, digits, spaces and punctuation")
    return name


def check_password(hashed: str, password: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return PasswordHasher().verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


class Store:
    def __init__(self, db: str, upgrade: bool = True):
        self.url = database_url(db)
        self.sqlite = self.url.startswith("sqlite")
        self.engine = engine_for(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = self.engine.execution_options(reading=True)  # see reading()
        self._readers = sessionmaker(self._reader, expire_on_commit=False)
        self._hot: dict | None = None  # the submit's statements, compiled for this database on first use
        self._outer: contextvars.ContextVar = contextvars.ContextVar(f"store-{id(self)}", default=None)
        if upgrade:
            self.upgrade()

    def upgrade(self) -> None:
        """Create or migrate the schema to the latest Alembic revision."""
        migrations.upgrade(self.engine)

    @contextmanager
    def checkpointing(self, every: float = 0.5):
        """While serving from a SQLite file: the log is first copied into the database and emptied (a log of
        tens of MB left by a bulk import or a crash would otherwise be copied during the first seconds of
        load, stalling requests for seconds); then commits stop copying the write-ahead log themselves (which
        stalls the committing request ~10 ms every few hundred submits) and a background thread does it
        every ``every`` seconds instead, off the request path (a PASSIVE checkpoint never blocks readers or
        writers; sqlite3 releases the GIL while it copies). A no-op on PostgreSQL."""
        import sqlite3
        import threading

        path = self.url.removeprefix("sqlite:///")
        if not self.url.startswith("sqlite:///") or path == ":memory:":
            yield
            return

        def no_autocheckpoint(conn, _):
            conn.execute("PRAGMA wal_autocheckpoint=0")

        event.listen(self.engine, "connect", no_autocheckpoint)
        self.engine.dispose()  # pooled connections reconnect with the setting
        stop = threading.Event()

        with closing(sqlite3.connect(path, timeout=30)) as con:  # start from an empty log: a log left by a bulk
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # import or a crash is copied now, not mid-load

        def run():
            with closing(sqlite3.connect(path, timeout=30)) as con:
                while not stop.wait(every):
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        thread = threading.Thread(target=run, name="sqlite-checkpoint", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            event.remove(self.engine, "connect", no_autocheckpoint)
            self.engine.dispose()

    @contextmanager
    def session(self):
        """One transaction: committed on success, rolled back on any error — or, inside :meth:`transaction`, a part
        of that one."""
        outer = self._outer.get()
        if outer is not None:
            yield outer
            return
        with self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def transaction(self):
        """The store calls made inside (in this thread or task) form one transaction: all kept, or none (an import
        that fails half-way leaves nothing behind)."""
        with self._sessions() as s, s.begin():
            token = self._outer.set(s)
            try:
                yield
            finally:
                self._outer.reset(token)

    @contextmanager
    def reading(self):
        """A read-only transaction. On SQLite it starts deferred: a snapshot that does not take the write lock,
        so a long read (an export, the agreement statistics) never holds up submits, and does not wait for them."""
        with self._readers() as s, s.begin():
            yield s

    # ------------------------------------------------------------------ users

    def add_user(self, name: str, password: str, role: str = "annotator") -> User:
        if role not in ROLES:
            raise Invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
        name = check_name(name)
        if len(password) < 8:
            raise Invalid("password: at least 8 characters")
        try:
            with self.session() as s:
                user = User(name=name, password_hash=hash_password(password), role=role)
                s.add(user)
                s.flush()
                s.add(Event(user_id=user.id, action="user.create", detail={"role": role}))
        except IntegrityError:
            raise Conflict(f"user {name!r} exists", "choose another name") from None
        return user

    def set_user(self, user_id: int, by: int, role: str | None = None, active: bool | None = None) -> None:
        """Change a user's role or switch them off (audited); an admin cannot lock themselves out."""
        if role is not None and role not in ROLES:
            raise Invalid(f"role {role!r} is not one of {', '.join(ROLES)}")
        if user_id == by and (active is False or (role is not None and role != "admin")):
            raise Conflict("you cannot demote or deactivate yourself", "ask another admin")
        with self.session() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"user {user_id} does not exist")
            if role is not None:
                user.role = role
            if active is not None:
                user.active = active
                if not active:
                    user.session_version += 1  # switched off: every session ends, for good
            s.add(Event(user_id=by, action="user.update", detail={"user": user_id, "role": role, "active": active}))

    def authenticate(self, name: str, password: str) -> User | None:
        """The active user with this name and password, else None — in the same time for a known name, an unknown
        one or a switched-off user (one argon2 check each), so the timing tells nothing."""
        with self.reading() as s:
            user = s.scalar(select(User).where(User.name == name))
        ok = check_password(user.password_hash if user is not None else dummy_hash(), password)
        return user if ok and user is not None and user.active else None

    def end_sessions(self, user_id: int) -> None:
        """Log out: every session of this user ends (the version in their cookies no longer matches)."""
        with self.session() as s:
            user = s.get(User, user_id)
            if user is not None:
                user.session_version += 1
                s.add(Event(user_id=user_id, action="user.logout", detail={}))

    def user(self, user_id: int) -> User | None:
        with self.reading() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.reading() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    # ------------------------------------------------------------------ content

    def add_prompt(self, messages: list[dict], source: str = "", round: int = 0, reference: str | None = None) -> int:
        with self.session() as s:
            p = Prompt(messages=messages, source=source, round=round, reference=reference)
            s.add(p)
            s.flush()
            return p.id

    def add_reply(self, prompt_id: int, text: str, model: str = "imported", checkpoint: str = "",
                  decoding: dict | None = None, template: str = "", round: int = 0) -> int:
        with self.session() as s:
            if s.get(Prompt, prompt_id) is None:
                raise NotFound(f"prompt {prompt_id} does not exist")
            r = Reply(prompt_id=prompt_id, text=text, model=model, checkpoint=checkpoint, decoding=decoding or {},
                      template=template, round=round)
            s.add(r)
            s.flush()
            return r.id

    def add_item(self, kind: str, reply_a: int, reply_b: int | None = None, k: int = 1, gold: dict | None = None,
                 round: int = 0) -> int:
        if kind not in KINDS:
            raise Invalid(f"item kind {kind!r} is not one of {', '.join(KINDS)}")
        if (kind == "compare") != (reply_b is not None):
            raise Invalid("a compare item needs two replies; rate and correct items one")
        if k < 1:
            raise Invalid("k (annotators per item) must be ≥ 1")
        with self.session() as s:
            a = s.get(Reply, reply_a)
            b = s.get(Reply, reply_b) if reply_b is not None else None
            if a is None or (reply_b is not None and b is None):
                raise NotFound("reply does not exist")
            if b is not None and b.prompt_id != a.prompt_id:
                raise Invalid("compared replies must answer the same prompt")
            item = Item(kind=kind, prompt_id=a.prompt_id, reply_a_id=reply_a, reply_b_id=reply_b, k=k, gold=gold,
                        round=round)
            s.add(item)
            s.flush()
            return item.id

    # ------------------------------------------------------------------ assignment

    def lease(self, user_id: int, kind: str | None = None, seconds: int = 600) -> int | None:
        """The id of the user's next item (see :meth:`lease_many`), or None."""
        items = self.lease_many(user_id, 1, kind, seconds)
        return items[0] if items else None

    def lease_many(self, user_id: int, count: int, kind: str | None = None, seconds: int = 600) -> list[int]:
        """Ids of up to ``count`` items for the user: those they hold a live lease on, then the oldest open items
        they have never held whose answers plus live leases are fewer than k. The candidates are locked and
        re-counted (a fresh statement, so PostgreSQL sees leases committed while it waited for the lock), and
        the query is repeated if a concurrent lease took some of them. An item that a lease fills records when its
        first live lease ends (``held_until``), so the scan passes items others hold without counting
        their leases; a skip sets it back to now."""
        t = now()
        count = max(1, min(count, 100))
        params = {"user": user_id, "t": t, "n": count, "kind": kind}
        with self.engine.begin() as c:
            held = list(c.execute(_HELD_OF_KIND if kind else _HELD, params).scalars())
            new: list[int] = []
            while len(held) + len(new) < count:
                candidates = list(c.execute(_OPEN_OF_KIND if kind else _OPEN,
                                            {**params, "n": count - len(held) - len(new)}).scalars())
                if not candidates:
                    break
                counts = c.execute(_TAKEN, {"ids": candidates, "t": t}).all()
                free = [i for i, k, taken in counts if taken < k]
                if free:
                    c.execute(Assignment.__table__.insert(), [
                        {"item_id": i, "user_id": user_id, "leased_at": t, "done": False,
                         "expires_at": t + dt.timedelta(seconds=seconds)} for i in free])
                    full = [i for i, k, taken in counts if taken + 1 == k and seconds > 0]  # this lease filled them
                    if full:
                        c.execute(_HOLD, {"ids": full, "t": t})
                new += free
            return held + new

    def assign(self, user_id: int, item_id: int, seconds: int = 600) -> None:
        """Lease one given item to a user (the chat page: the reply they just got is theirs to rate)."""
        with self.session() as s:
            s.add(Assignment(item_id=item_id, user_id=user_id, expires_at=now() + dt.timedelta(seconds=seconds)))

    def prompts_without_replies(self, limit: int = 100) -> list[tuple[int, list]]:
        with self.reading() as s:
            answered = select(Reply.prompt_id)
            return [(p.id, p.messages) for p in s.scalars(select(Prompt).where(Prompt.id.not_in(answered))
                                                          .order_by(Prompt.id).limit(limit))]

    def item_view(self, item_id: int, user_id: int, role: str) -> dict:
        """What the annotator sees of an item: only their own assigned items (admins see all)."""
        views = self.item_views([item_id], user_id, role)
        if not views:
            raise NotFound(f"item {item_id} does not exist")
        return views[0]

    def item_views(self, item_ids: list[int], user_id: int, role: str) -> list[dict]:
        """Several items in one query (404 if any is not the user's, unless admin: the same answer as for an item
        that does not exist, so ids tell nothing)."""
        with self._reader.begin() as c:
            rows = c.execute(_VIEWS, {"ids": list(item_ids), "user": user_id}).all()
        for row in rows:
            if not row.assigned and role != "admin":
                raise NotFound(f"item {row.id} does not exist")
        return [{"id": r.id, "kind": r.kind, "messages": r.messages, "a": r.a, "b": r.b} for r in rows]

    # ------------------------------------------------------------------ answers

    def submit(self, user_id: int, item_id: int, **answer) -> tuple[int, bool]:
        """Store one answer; returns (answer id, created). A repeat of an answered item returns the first
        answer (created False); a (k+1)-th answer is refused with 409. This is the hot path of the web app:
        four or five statements compiled once for the database (see :class:`_Compiled`) in one transaction on
        the DB-API connection. The answer row is its own audit record (who, what, when), so submits write no
        extra event."""
        t = now()
        params = {"item": item_id, "user": user_id, "t": t}
        run = self._compiled
        try:
            with self._transaction() as cur:
                item = run("lock_item", cur, params).fetchone()
                if item is None:
                    raise NotFound(f"item {item_id} does not exist")
                kind, k = item
                fields = _answer_fields(kind, answer)  # a bad answer is a 400 even for an answered item
                first, mine, others, answered = run(f"counts_{kind}", cur, params).fetchone()
                if first is not None:
                    return int(first), False
                if not mine:
                    raise NotFound(f"item {item_id} does not exist")
                if (others or 0) >= k:
                    raise Conflict(f"item {item_id} already has its {k} answer(s)",
                                        "your lease expired and others answered; take the next item")
                (answer_id,) = run(f"insert_{kind}", cur, {**params, **fields}).fetchone()
                run("lease_done", cur, params)
                if (answered or 0) + 1 >= k:  # every answer is a done lease
                    run("filled", cur, params)
                return int(answer_id), True  # (SQLite's RETURNING can give 405.0 after a FLOAT column)
        except self.engine.dialect.loaded_dbapi.IntegrityError:  # a concurrent double submit by the same user
            with self.session() as s:                              # lost the race: return the first answer
                table = ANSWERS[s.get(Item, item_id).kind]
                return int(s.scalar(select(table.id).where(table.item_id == item_id, table.user_id == user_id))), False

    @contextmanager
    def _transaction(self):
        """A write transaction on a pooled DB-API connection (SQLite: ``BEGIN IMMEDIATE``, as the engine's own
        transactions begin); committed on success, rolled back on any error."""
        conn = self.engine.raw_connection()
        try:
            cur = conn.cursor()
            if self.sqlite:
                cur.execute("BEGIN IMMEDIATE")
            yield cur
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            conn.close()  # back to the pool

    def _compiled(self, name: str, cur, params: dict):
        if self._hot is None:
            self._hot = {name: _Compiled(stmt, self.engine.dialect) for name, stmt in _HOT.items()}
        return self._hot[name](cur, params)

    def skip(self, user_id: int, item_id: int) -> None:
        """Give an item back: the lease ends now and the item is not offered to this user again."""
        with self.session() as s:
            lease = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user_id,
                                                      Assignment.done.is_(False)))
            if lease is not None:
                lease.expires_at = now()
                s.get(Item, item_id).held_until = lease.expires_at  # free again now, not when the lease would end
                s.add(Event(user_id=user_id, action="item.skip", detail={"item": item_id}))

    def progress(self, user_id: int | None = None) -> dict:
        """Answers given (by one user, or by all) and answers still needed."""
        with self.reading() as s:
            needed = sum(s.scalars(select(Item.k))) or 0
            done = 0
            for table in ANSWERS.values():
                q = select(func.count()).select_from(table)
                done += s.scalar(q.where(table.user_id == user_id) if user_id is not None else q)
            return {"answers": done, "needed": needed}


# ---------------------------------------------------------------------- prebuilt statements of the hot paths
# Built once with bind parameters: SQLAlchemy then only looks them up in its compiled cache (~30 µs a
# statement instead of ~150 µs to build and key a fresh one each request). The submit's (_HOT) go further:
# compiled once per database and run on the DB-API cursor (_Compiled).

_A = Assignment.__table__.c
_I = Item.__table__.c
_LIVE = or_(_A.done.is_(True), _A.expires_at > bindparam("t", type_=DateTime))
_HELD = (select(_A.item_id).where(_A.user_id == bindparam("user"), _A.done.is_(False),
                                  _A.expires_at > bindparam("t", type_=DateTime))
         .order_by(_A.item_id).limit(bindparam("n")))
_HELD_OF_KIND = _HELD.join(Item.__table__, _I.id == _A.item_id).where(_I.kind == bindparam("kind"))
_TAKEN_OF_ITEM = select(func.count()).select_from(Assignment).where(_A.item_id == _I.id, _LIVE).scalar_subquery()
_OPEN = (select(_I.id).where(_I.filled.is_(False),
                             or_(_I.held_until.is_(None), _I.held_until <= bindparam("t", type_=DateTime)),
                             # never held by the user: one probe of the (item, user) index
                             ~select(_A.id).where(_A.item_id == _I.id, _A.user_id == bindparam("user")).exists(),
                             _TAKEN_OF_ITEM < _I.k)
         .order_by(_I.id).limit(bindparam("n")).with_for_update(of=Item.__table__))
_OPEN_OF_KIND = _OPEN.where(_I.kind == bindparam("kind"))
_TAKEN = select(_I.id, _I.k, _TAKEN_OF_ITEM).where(_I.id.in_(bindparam("ids", expanding=True)))  # a batch's re-count
_HOLD = (Item.__table__.update().where(_I.id.in_(bindparam("ids", expanding=True)))  # full items: held until the
         .values(held_until=select(func.min(_A.expires_at))                           # first live lease ends
                 .where(_A.item_id == _I.id, _A.done.is_(False), _A.expires_at > bindparam("t", type_=DateTime))
                 .scalar_subquery()))


def _submit_counts(answers):
    """The user's first answer to the item (if any), their leases on it, others' live leases, others' answers."""
    return select(
        select(answers.c.id).where(answers.c.item_id == bindparam("item"), answers.c.user_id == bindparam("user"))
        .scalar_subquery(),
        func.sum(case((_A.user_id == bindparam("user"), 1), else_=0)),
        func.sum(case(((_A.user_id != bindparam("user")) & _LIVE, 1), else_=0)),
        func.sum(case(((_A.user_id != bindparam("user")) & _A.done.is_(True), 1), else_=0)),
    ).where(_A.item_id == bindparam("item"))


def _insert_answer(answers):
    """Every column but the id; the item, user and time under the submit's own parameter names, the rest
    (_answer_fields' keys) under their column names."""
    names = {"item_id": "item", "user_id": "user", "created_at": "t"}
    return answers.insert().values({c: bindparam(names.get(c.name, c.name), type_=c.type) for c in answers.columns
                                    if c.name != "id"}).returning(answers.c.id)
_HOT = {  # the submit's statements, run by Store._compiled
    "lock_item": select(_I.kind, _I.k).where(_I.id == bindparam("item")).with_for_update(),
    **{f"counts_{kind}": _submit_counts(m.__table__) for kind, m in ANSWERS.items()},
    **{f"insert_{kind}": _insert_answer(m.__table__) for kind, m in ANSWERS.items()},
    "lease_done": Assignment.__table__.update().where(_A.item_id == bindparam("item"), _A.user_id == bindparam("user"))
    .values(done=True),
    "filled": Item.__table__.update().where(_I.id == bindparam("item")).values(filled=True),
}


class _Compiled:
    """A statement compiled once for one database and run straight on a DB-API cursor. SQLAlchemy's execution
    layer (compiled-cache lookup, parameter and result wrapping, events) was ~40% of a submit's CPU in the
    web app; this keeps only what the driver needs: the SQL text, the parameter order of a positional
    paramstyle (SQLite's ``?``), the constants the statement binds itself, and the type conversions the
    dialect applies to parameters (SQLite stores a datetime as text in one fixed format, so comparisons of
    stored and bound times must see the same format)."""

    def __init__(self, stmt, dialect):
        c = stmt.compile(dialect=dialect)
        self.sql, self.order = c.string, c.positiontup  # positiontup: None for named paramstyles (psycopg)
        binds = {name: b for b, name in c.bind_names.items()}
        self.convert = {name: f for name, b in binds.items()
                        if (f := b.type.dialect_impl(dialect).bind_processor(dialect)) is not None}
        self.fixed = {name: self.convert.get(name, lambda v: v)(b.value) for name, b in binds.items() if not b.required}

    def __call__(self, cur, params: dict):
        p = {**self.fixed, **{k: self.convert[k](v) if k in self.convert else v for k, v in params.items()}}
        cur.execute(self.sql, [p[name] for name in self.order] if self.order is not None else p)
        return cur


_RA, _RB = Reply.__table__.alias("ra"), Reply.__table__.alias("rb")
_VIEWS = (select(_I.id, _I.kind, Prompt.__table__.c.messages, _RA.c.text.label("a"), _RB.c.text.label("b"),
                 select(func.count()).select_from(Assignment).where(_A.item_id == _I.id, _A.user_id == bindparam("user"))
                 .scalar_subquery().label("assigned"))
          .join(Prompt.__table__, Prompt.__table__.c.id == _I.prompt_id)
          .join(_RA, _RA.c.id == _I.reply_a_id).outerjoin(_RB, _RB.c.id == _I.reply_b_id)
          .where(_I.id.in_(bindparam("ids", expanding=True))).order_by(_I.id))


def _answer_fields(kind: str, a: dict) -> dict:
    """Validated columns of one answer (400 with the field named on bad input): numbers must be numbers and texts
    texts — never a list or a file stored as its Python repr."""
    for key in ("reason", "corrected", "choice"):
        if a.get(key) is not None and not isinstance(a[key], str):
            raise Invalid(f"{key} must be text, got {type(a[key]).__name__}")
    for key in ("score", "confidence", "thumbs"):
        if isinstance(a.get(key), bool):
            raise Invalid(f"{key} must be a number, got a boolean")
    reason = (a.get("reason") or "")[:4000]
    if kind == "rate":
        score, thumbs = a.get("score"), a.get("thumbs")
        if score is None and thumbs is None:
            raise Invalid("rating: give score (1–5) or thumbs (+1/−1)")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool) or not 1 <= score <= 5):
            raise Invalid(f"rating: score {score!r} is out of range", "use 1–5")
        if thumbs is not None and thumbs not in (1, -1):
            raise Invalid(f"rating: thumbs {thumbs!r} is not +1 or −1")
        return {"score": score, "thumbs": thumbs, "reason": reason}
    if kind == "compare":
        choice, conf = a.get("choice"), a.get("confidence")
        if choice not in CHOICES:
            raise Invalid(f"comparison: choice {choice!r} is not one of {', '.join(CHOICES)}")
        if conf is not None and (not isinstance(conf, (int, float)) or not 0 <= conf <= 1):
            raise Invalid(f"comparison: confidence {conf!r} is out of range", "use 0–1")
        return {"choice": choice, "confidence": conf, "a_shown_first": bool(a.get("a_shown_first", True)),
                "reason": reason}
    corrected = (a.get("corrected") or "").strip()
    if not corrected:
        raise Invalid("correction: the corrected reply is empty")
    return {"corrected": corrected, "reason": reason}


def content_hash(paths: list[Path]) -> str:
    """SHA-256 over the files' names and bytes, in path order (exports; a served model's weights), read in 1 MiB
    chunks so a checkpoint never sits in memory whole."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()



WEIGHTS = ("*.safetensors", "*.bin", "*.gguf", "*.pt")  # the files a model's checkpoint hash covers


def weights_hash(model: str | Path) -> str | None:
    """``sha256:<hex>`` of the weight files of a model folder (or of a weights file) — the checkpoint every stored
    reply and every loop round names; None for a name that is no file (an embedded or tiny test model)."""
    path = Path(model).expanduser()
    files = sorted(f for pattern in WEIGHTS for f in path.glob(pattern)) if path.is_dir() else \
        [path] if path.is_file() else []
    return f"sha256:{content_hash(files)}" if files else None