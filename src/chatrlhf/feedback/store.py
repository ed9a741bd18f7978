"""The human feedback store: SQLAlchemy 2 models and the operations the web app and the exporter use.

SQLite (a file, WAL journal) by default; PostgreSQL by URL (``postgresql+psycopg://…``). The schema is
created and upgraded by Alembic (``feedback/migrations``), never by ``create_all``.

Exactness: every item is answered by exactly ``k`` annotators. A submit runs in one write transaction
that first locks the item (``SELECT … FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite, which
serialises writers), counts its answers and the live leases of other annotators, and refuses a
(k+1)-th answer. A unique (item, annotator) constraint makes a double submit return the first answer
instead of storing a second one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, \
    case, create_engine, event, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from chatrlhf.errors import UsageError

ROLES = ("admin", "annotator", "viewer")
KINDS = ("rate", "compare", "correct")
CHOICES = ("a", "b", "tie", "both_bad")


class FeedbackError(UsageError):
    """A request the store refuses; ``status`` is the HTTP status the web app answers with."""

    def __init__(self, message: str, hint: str = "", status: int = 400):
        super().__init__(message, hint)
        self.status = status


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    messages: Mapped[list] = mapped_column(JSON)          # [{"role", "content"}, …] up to the reply
    reference: Mapped[str | None] = mapped_column(Text)   # a human reply, if one came with the prompt
    source: Mapped[str] = mapped_column(String(256), default="")
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Reply(Base):
    __tablename__ = "replies"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(256), default="")       # model name or "imported"
    checkpoint: Mapped[str] = mapped_column(String(256), default="")  # checkpoint id / content hash
    decoding: Mapped[dict] = mapped_column(JSON, default=dict)        # temperature, top_k, …
    template: Mapped[str] = mapped_column(Text, default="")           # the prompt template used
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Item(Base):
    """One task: rate a reply, compare two, or correct one. ``gold`` holds the known answer of a gold item."""
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_open", "filled", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    reply_a_id: Mapped[int] = mapped_column(ForeignKey("replies.id"))
    reply_b_id: Mapped[int | None] = mapped_column(ForeignKey("replies.id"))
    k: Mapped[int] = mapped_column(Integer, default=1)
    filled: Mapped[bool] = mapped_column(Boolean, default=False)  # has its k answers: never offered again
    gold: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))  # SQL NULL, not JSON null
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Assignment(Base):
    """A lease: ``user`` may answer ``item`` until ``expires_at``; ``done`` once answered."""
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    done: Mapped[bool] = mapped_column(Boolean, default=False)


class _Answer:
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class Rating(_Answer, Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    score: Mapped[float | None] = mapped_column(Float)     # 1–5 stars
    thumbs: Mapped[int | None] = mapped_column(Integer)    # +1 / −1


class Comparison(_Answer, Base):
    __tablename__ = "comparisons"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    choice: Mapped[str] = mapped_column(String(16))                   # a | b | tie | both_bad (item's a/b)
    a_shown_first: Mapped[bool] = mapped_column(Boolean, default=True)  # the random screen order
    confidence: Mapped[float | None] = mapped_column(Float)           # optional strength, 0–1


class Correction(_Answer, Base):
    __tablename__ = "corrections"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    corrected: Mapped[str] = mapped_column(Text)


class Event(Base):
    """Audit trail: who did what, when."""
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


ANSWERS = {"rate": Rating, "compare": Comparison, "correct": Correction}


def database_url(db: str) -> str:
    """A SQLAlchemy URL from ``--db``: a URL as given, or a file path for SQLite."""
    return db if "://" in db else f"sqlite:///{Path(db).expanduser().resolve()}"


def engine_for(url: str):
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
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
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue here instead of failing mid-transaction

    return engine


def hash_password(password: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


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
        self.engine = engine_for(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            self.upgrade()

    def upgrade(self) -> None:
        """Create or migrate the schema to the latest Alembic revision."""
        from chatrlhf.feedback.migrations import upgrade

        upgrade(self.engine)

    @contextmanager
    def session(self):
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    # ------------------------------------------------------------------ users

    def add_user(self, name: str, password: str, role: str = "annotator") -> User:
        if role not in ROLES:
            raise FeedbackError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not name.strip() or len(name) > 64:
            raise FeedbackError("user name: 1–64 characters")
        if len(password) < 8:
            raise FeedbackError("password: at least 8 characters")
        try:
            with self.session() as s:
                user = User(name=name.strip(), password_hash=hash_password(password), role=role)
                s.add(user)
                s.flush()
                s.add(Event(user_id=user.id, action="user.create", detail={"role": role}))
        except IntegrityError:
            raise FeedbackError(f"user {name!r} exists", "choose another name", status=409) from None
        return user

    def set_user(self, user_id: int, by: int, role: str | None = None, active: bool | None = None) -> None:
        """Change a user's role or switch them off (audited); an admin cannot lock themselves out."""
        if role is not None and role not in ROLES:
            raise FeedbackError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if user_id == by and (active is False or (role is not None and role != "admin")):
            raise FeedbackError("you cannot demote or deactivate yourself", "ask another admin", status=409)
        with self.session() as s:
            user = s.get(User, user_id)
            if user is None:
                raise FeedbackError(f"user {user_id} does not exist", status=404)
            if role is not None:
                user.role = role
            if active is not None:
                user.active = active
            s.add(Event(user_id=by, action="user.update", detail={"user": user_id, "role": role, "active": active}))

    def authenticate(self, name: str, password: str) -> User | None:
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name, User.active.is_(True)))
            return user if user is not None and check_password(user.password_hash, password) else None

    def user(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    def users(self) -> list[User]:
        with self.session() as s:
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
                raise FeedbackError(f"prompt {prompt_id} does not exist", status=404)
            r = Reply(prompt_id=prompt_id, text=text, model=model, checkpoint=checkpoint, decoding=decoding or {},
                      template=template, round=round)
            s.add(r)
            s.flush()
            return r.id

    def add_item(self, kind: str, reply_a: int, reply_b: int | None = None, k: int = 1, gold: dict | None = None,
                 round: int = 0) -> int:
        if kind not in KINDS:
            raise FeedbackError(f"item kind {kind!r} is not one of {', '.join(KINDS)}")
        if (kind == "compare") != (reply_b is not None):
            raise FeedbackError("a compare item needs two replies; rate and correct items one")
        if k < 1:
            raise FeedbackError("k (annotators per item) must be ≥ 1")
        with self.session() as s:
            a = s.get(Reply, reply_a)
            b = s.get(Reply, reply_b) if reply_b is not None else None
            if a is None or (reply_b is not None and b is None):
                raise FeedbackError("reply does not exist", status=404)
            if b is not None and b.prompt_id != a.prompt_id:
                raise FeedbackError("compared replies must answer the same prompt")
            item = Item(kind=kind, prompt_id=a.prompt_id, reply_a_id=reply_a, reply_b_id=reply_b, k=k, gold=gold,
                        round=round)
            s.add(item)
            s.flush()
            return item.id

    # ------------------------------------------------------------------ assignment

    def lease(self, user_id: int, kind: str | None = None, seconds: int = 600) -> Item | None:
        """The user's next item (see :meth:`lease_many`), or None."""
        items = self.lease_many(user_id, 1, kind, seconds)
        return items[0] if items else None

    def lease_many(self, user_id: int, count: int, kind: str | None = None, seconds: int = 600) -> list[Item]:
        """Up to ``count`` items for the user: those they hold a live lease on, then the oldest open items they
        have never held whose answers plus live leases are fewer than k — each re-counted under a row lock."""
        t = now()
        count = max(1, min(count, 100))
        with self.session() as s:
            held = list(s.scalars(select(Item).join(Assignment, Assignment.item_id == Item.id).where(
                Assignment.user_id == user_id, Assignment.done.is_(False), Assignment.expires_at > t)
                .order_by(Item.id).limit(count)))
            mine = select(Assignment.item_id).where(Assignment.user_id == user_id)
            query = select(Item.id).where(Item.filled.is_(False), Item.id.not_in(mine),
                                          self._taken_sql(t) < Item.k).order_by(Item.id).limit(count - len(held))
            if kind:
                query = query.where(Item.kind == kind)
            new = []
            for item_id in list(s.scalars(query)) if len(held) < count else []:
                item = s.scalar(select(Item).where(Item.id == item_id).with_for_update())  # recount under the lock
                if s.scalar(select(self._taken_sql(t)).where(Item.id == item_id)) < item.k:
                    s.add(Assignment(item_id=item.id, user_id=user_id, expires_at=t + dt.timedelta(seconds=seconds)))
                    new.append(item)
            if new:
                s.add(Event(user_id=user_id, action="item.lease", detail={"items": [i.id for i in new]}))
            return held + new

    def assign(self, user_id: int, item_id: int, seconds: int = 600) -> None:
        """Lease one given item to a user (the chat page: the reply they just got is theirs to rate)."""
        with self.session() as s:
            s.add(Assignment(item_id=item_id, user_id=user_id, expires_at=now() + dt.timedelta(seconds=seconds)))

    def prompts_without_replies(self, limit: int = 100) -> list[tuple[int, list]]:
        with self.session() as s:
            answered = select(Reply.prompt_id)
            return [(p.id, p.messages) for p in s.scalars(select(Prompt).where(Prompt.id.not_in(answered))
                                                          .order_by(Prompt.id).limit(limit))]

    @staticmethod
    def _taken_sql(t: dt.datetime):
        """Answers plus live leases of an item, as a correlated subquery on Item (every answer came through a
        lease, which it marked done)."""
        return select(func.count()).select_from(Assignment).where(
            Assignment.item_id == Item.id, or_(Assignment.done.is_(True), Assignment.expires_at > t)).scalar_subquery()

    def item_view(self, item_id: int, user_id: int, role: str) -> dict:
        """What the annotator sees of an item: only their own assigned items (admins see all)."""
        views = self.item_views([item_id], user_id, role)
        if not views:
            raise FeedbackError(f"item {item_id} does not exist", status=404)
        return views[0]

    def item_views(self, item_ids: list[int], user_id: int, role: str) -> list[dict]:
        """Several items in one transaction (403 if any is not the user's, unless admin)."""
        with self.session() as s:
            items = list(s.scalars(select(Item).where(Item.id.in_(item_ids)).order_by(Item.id)))
            if role != "admin":
                assigned = set(s.scalars(select(Assignment.item_id).where(Assignment.item_id.in_(item_ids),
                                                                          Assignment.user_id == user_id)))
                for item in items:
                    if item.id not in assigned:
                        raise FeedbackError(f"item {item.id} is not assigned to you", status=403)
            prompts = {p.id: p for p in s.scalars(select(Prompt).where(Prompt.id.in_({i.prompt_id for i in items})))}
            reply_ids = {i.reply_a_id for i in items} | {i.reply_b_id for i in items if i.reply_b_id}
            replies = {r.id: r.text for r in s.scalars(select(Reply).where(Reply.id.in_(reply_ids)))}
            return [{"id": i.id, "kind": i.kind, "messages": prompts[i.prompt_id].messages, "a": replies[i.reply_a_id],
                     "b": replies.get(i.reply_b_id)} for i in items]

    # ------------------------------------------------------------------ answers

    def submit(self, user_id: int, item_id: int, **answer) -> tuple[int, bool]:
        """Store one answer; returns (answer id, created). A repeat of an answered item returns the first
        answer (created False); a (k+1)-th answer is refused with 409. SQLAlchemy Core, five statements in
        one transaction: this is the hot path of the web app."""
        t = now()
        try:
            with self.engine.begin() as c:
                item = c.execute(select(Item.kind, Item.k).where(Item.id == item_id).with_for_update()).first()
                if item is None:
                    raise FeedbackError(f"item {item_id} does not exist", status=404)
                table = ANSWERS[item.kind].__table__
                first = c.execute(select(table.c.id).where(table.c.item_id == item_id, table.c.user_id == user_id)).scalar()
                if first is not None:
                    return first, False
                a = Assignment.__table__.c
                live = or_(a.done.is_(True), a.expires_at > t)
                mine, others, answered = c.execute(select(
                    func.sum(case((a.user_id == user_id, 1), else_=0)),
                    func.sum(case(((a.user_id != user_id) & live, 1), else_=0)),
                    func.sum(case(((a.user_id != user_id) & a.done.is_(True), 1), else_=0))).where(a.item_id == item_id)).one()
                if not mine:
                    raise FeedbackError(f"item {item_id} is not assigned to you", status=403)
                if (others or 0) >= item.k:
                    raise FeedbackError(f"item {item_id} already has its {item.k} answer(s)",
                                        "your lease expired and others answered; take the next item", status=409)
                fields = _answer_fields(item.kind, answer)
                answer_id = c.execute(table.insert().values(item_id=item_id, user_id=user_id, created_at=t, **fields)
                                      .returning(table.c.id)).scalar()
                c.execute(Assignment.__table__.update().where(a.item_id == item_id, a.user_id == user_id)
                          .values(done=True))
                if (answered or 0) + 1 >= item.k:  # every answer is a done lease
                    c.execute(Item.__table__.update().where(Item.id == item_id).values(filled=True))
                c.execute(Event.__table__.insert().values(user_id=user_id, action=f"answer.{item.kind}", at=t,
                                                          detail={"item": item_id, "answer": answer_id}))
                return answer_id, True
        except IntegrityError:  # a concurrent double submit by the same user lost the race: return the first
            with self.session() as s:
                table = ANSWERS[s.get(Item, item_id).kind]
                return s.scalar(select(table.id).where(table.item_id == item_id, table.user_id == user_id)), False

    def skip(self, user_id: int, item_id: int) -> None:
        """Give an item back: the lease ends now and the item is not offered to this user again."""
        with self.session() as s:
            lease = s.scalar(select(Assignment).where(Assignment.item_id == item_id, Assignment.user_id == user_id,
                                                      Assignment.done.is_(False)))
            if lease is not None:
                lease.expires_at = now()
                s.add(Event(user_id=user_id, action="item.skip", detail={"item": item_id}))

    def progress(self, user_id: int | None = None) -> dict:
        """Answers given (by one user, or by all) and answers still needed."""
        with self.session() as s:
            needed = sum(s.scalars(select(Item.k))) or 0
            done = 0
            for table in ANSWERS.values():
                q = select(func.count()).select_from(table)
                done += s.scalar(q.where(table.user_id == user_id) if user_id is not None else q)
            return {"answers": done, "needed": needed}


def _answer_fields(kind: str, a: dict) -> dict:
    """Validated columns of one answer (400 with the field named on bad input)."""
    reason = str(a.get("reason") or "")[:4000]
    if kind == "rate":
        score, thumbs = a.get("score"), a.get("thumbs")
        if score is None and thumbs is None:
            raise FeedbackError("rating: give score (1–5) or thumbs (+1/−1)")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool) or not 1 <= score <= 5):
            raise FeedbackError(f"rating: score {score!r} is out of range", "use 1–5")
        if thumbs is not None and thumbs not in (1, -1):
            raise FeedbackError(f"rating: thumbs {thumbs!r} is not +1 or −1")
        return {"score": score, "thumbs": thumbs, "reason": reason}
    if kind == "compare":
        choice, conf = a.get("choice"), a.get("confidence")
        if choice not in CHOICES:
            raise FeedbackError(f"comparison: choice {choice!r} is not one of {', '.join(CHOICES)}")
        if conf is not None and (not isinstance(conf, (int, float)) or not 0 <= conf <= 1):
            raise FeedbackError(f"comparison: confidence {conf!r} is out of range", "use 0–1")
        return {"choice": choice, "confidence": conf, "a_shown_first": bool(a.get("a_shown_first", True)),
                "reason": reason}
    corrected = str(a.get("corrected") or "").strip()
    if not corrected:
        raise FeedbackError("correction: the corrected reply is empty")
    return {"corrected": corrected, "reason": reason}


def content_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()
