"""Load on the feedback server: many annotators submitting at once, then a crash in the middle of it.

    .venv/bin/python benchmarks/feedback_load.py [--clients 50] [--seconds 30] [--db sqlite|URL]

1. Starts `chatrlhf feedback serve` on a fresh SQLite store (WAL) with enough compare items for the run
   and one annotator per client. Each client logs in over the JSON API, leases items in batches
   (`GET /api/next?count=20`) and submits an answer to each (`POST /api/items/{id}`); a submission counts
   once the server acknowledged it (201). Prints submissions/s and the latency percentiles of the submits,
   then checks that every acknowledged answer is in the database, once.
2. Runs the load again, SIGKILLs the server halfway, restarts it on the same file, and checks again: no
   acknowledged submission lost, none duplicated (clients retry their unacknowledged submits after the
   restart, as a browser would — those must not double either).
Goal (issue 6): ≥ 500 submissions/s with p99 < 50 ms on 2 cores. Writes benchmarks/results/feedback_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(db: str, clients: int, items: int) -> None:
    from chatrlhf.feedback.store import Item, Prompt, Reply, Store, User, hash_password

    store = Store(db)
    with store.session() as s:  # bulk insert: this is set-up, not the thing measured
        pw = hash_password("load-test-password")
        s.add_all([User(name=f"c{i}", password_hash=pw, role="annotator") for i in range(clients)])
        s.add_all([Prompt(id=i + 1, messages=[{"role": "user", "content": f"prompt {i}"}]) for i in range(items)])
        s.flush()
        s.add_all([Reply(id=2 * i + 1 + j, prompt_id=i + 1, text=f"reply {j} to prompt {i}") for i in range(items)
                   for j in (0, 1)])
        s.flush()
        s.add_all([Item(kind="compare", prompt_id=i + 1, reply_a_id=2 * i + 1, reply_b_id=2 * i + 2, k=1)
                   for i in range(items)])


WORKERS = 1


def start(db: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "CHATRLHF_SECRET": "load-test-secret-load-test-secret"}
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "feedback", "serve", "--db", db, "--port", str(port),
                             "--workers", str(WORKERS)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


class Conn:
    """A minimal keep-alive HTTP/1.1 client over asyncio streams: the load generator shares the 2 cores with
    the server, and httpx spends about as much CPU per request as the server does."""

    def __init__(self, port: int):
        self.port, self.cookie, self.reader, self.writer = port, "", None, None

    async def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", f"Content-Length: {len(data)}",
                "Content-Type: application/json"] + ([f"Cookie: {self.cookie}"] if self.cookie else []) + \
            [f"{k}: {v}" for k, v in (headers or {}).items()]
        try:
            self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("closed")
            length, cookie = 0, None
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "set-cookie":
                    cookie = value.strip().split(";", 1)[0]
            payload = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            self.writer = None
            raise ConnectionError("server gone") from None
        if cookie and path == "/api/login":
            self.cookie = cookie
        return int(status_line.split()[1]), json.loads(payload or b"null")


async def client(i: int, port: int, until: float, acked: dict, lat: list, pending: dict, stop: asyncio.Event,
                 ready: asyncio.Event | None = None, logged_in: list | None = None):
    c = Conn(port)
    while not stop.is_set():
        try:
            status, body = await c.request("POST", "/api/login", {"name": f"c{i}", "password": "load-test-password"})
            csrf = body["csrf"]
            if logged_in is not None:
                logged_in.append(i)
            break
        except (ConnectionError, KeyError, TypeError):
            await asyncio.sleep(0.2)
    else:
        return
    await ready.wait() if ready is not None else None
    until = time.perf_counter() + until  # the clock starts once every client has logged in
    queue = list(pending.pop(i, []))  # unacknowledged submits from before a crash are retried first
    while time.perf_counter() < until and not stop.is_set():
        if not queue:
            try:
                _, body = await c.request("GET", "/api/next?count=20")
            except ConnectionError:
                await asyncio.sleep(0.05)
                continue
            queue = [x["id"] for x in body["items"]]
            if not queue:
                break
        item = queue[0]
        t0 = time.perf_counter()
        try:
            status, body = await c.request("POST", f"/api/items/{item}", {"choice": "a"}, {"X-CSRF-Token": csrf})
        except ConnectionError:
            pending[i] = queue
            await asyncio.sleep(0.05)
            continue
        if status in (200, 201):
            lat.append(time.perf_counter() - t0)
            acked[(i, item)] = body["answer"]
            queue.pop(0)
        else:
            raise RuntimeError(f"client {i}: {status} {body}")
    if queue:
        pending[i] = queue


def run_load(port: int, clients: int, seconds: float, acked: dict, pending: dict, kill=None) -> tuple[list, float]:
    """Clients log in, then all start together for ``seconds``; returns (submit latencies, seconds measured)."""
    lat: list[float] = []
    span = [0.0, 0.0]

    async def main():
        stop, ready, logged_in = asyncio.Event(), asyncio.Event(), []
        tasks = [asyncio.create_task(client(i, port, seconds, acked, lat, pending, stop, ready, logged_in))
                 for i in range(clients)]
        while len(logged_in) < clients:
            await asyncio.sleep(0.01)
        span[0] = time.perf_counter()
        ready.set()
        if kill is not None:
            await asyncio.sleep(seconds / 2)
            kill()
            stop.set()
        await asyncio.gather(*tasks)
        span[1] = time.perf_counter()

    asyncio.run(main())
    return lat, span[1] - span[0]


def check(db: str, acked: dict) -> dict:
    from sqlalchemy import func, select

    from chatrlhf.feedback.store import Comparison, Store, User

    store = Store(db)
    with store.session() as s:
        names = {u.id: u.name for u in s.scalars(select(User))}
        rows = s.execute(select(Comparison.id, Comparison.user_id, Comparison.item_id)).all()
        per_item = s.execute(select(Comparison.item_id, func.count()).group_by(Comparison.item_id)
                             .having(func.count() > 1)).all()
    stored = {(int(names[u][1:]), item): aid for aid, u, item in rows}
    lost = [k for k, aid in acked.items() if stored.get(k) != aid]
    return {"acknowledged": len(acked), "stored": len(rows), "lost": len(lost), "items_answered_twice": len(per_item)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--items", type=int, default=60000, help="compare items in the store (k = 1)")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    a = p.parse_args()
    global WORKERS
    WORKERS = a.workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    db = str(tmp / "feedback.db")
    fill(db, a.clients, a.items)
    port = free_port()

    server = start(db, port)
    acked: dict = {}
    pending: dict = {}
    lat, wall = run_load(port, a.clients, a.seconds, acked, pending)
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    steady = {"submissions_per_s": len(lat) / wall, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
              "submissions": len(lat), **check(db, acked)}
    print(f"{a.clients} clients × {a.seconds:.0f} s: {steady['submissions_per_s']:.0f} submissions/s, p50 "
          f"{steady['p50_ms']:.1f} ms, p99 {steady['p99_ms']:.1f} ms; acknowledged {steady['acknowledged']}, stored "
          f"{steady['stored']}, lost {steady['lost']}, answered twice {steady['items_answered_twice']}")

    server = start(db, port)  # the crash: SIGKILL halfway through a second run, restart, let clients retry
    before = len(acked)
    run_load(port, a.clients, a.seconds, acked, pending, kill=lambda: os.killpg(server.pid, signal.SIGKILL))
    server.wait(30)
    killed_with_pending = sum(len(v) for v in pending.values())
    server = start(db, port)
    run_load(port, a.clients, 3.0, acked, pending)
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    crash = {"acknowledged_in_crash_run": len(acked) - before, "unacknowledged_retried": killed_with_pending,
             **check(db, acked)}
    print(f"SIGKILL mid-load, restart: acknowledged {crash['acknowledged']} in all, stored {crash['stored']}, lost "
          f"{crash['lost']}, answered twice {crash['items_answered_twice']} ({killed_with_pending} unacknowledged "
          f"submits retried after the restart)")
    ok = steady["submissions_per_s"] >= 500 and steady["p99_ms"] < 50
    print(f"goal (≥ 500/s, p99 < 50 ms, nothing lost or doubled): "
          f"{'met' if ok and not crash['lost'] and not crash['items_answered_twice'] else 'NOT met'}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback_load.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "settings": vars(a), "steady": steady,
         "crash": crash}, indent=2) + "\n")


if __name__ == "__main__":
    main()
