import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args, timeout=600, env=None, input=None, process=False):  # noqa: A002 - mirrors subprocess.run
    """Run the real `chatrlhf` command: its parser, its error handling, its exit status and output. In this
    process (an import of torch and transformers saved per call, ~2.5 s), or in a subprocess when ``env`` is given
    or ``process`` asked for."""
    argv = [str(a) for a in args]
    if env is not None or process:
        return subprocess.run([sys.executable, "-m", "chatrlhf.cli", *argv], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})}, input=input)
    from chatrlhf import cli

    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse: --help, bad flags
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.stdin = stdin
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_sigkill_resume_matches(argv, tmp_path, steps: int, heads_file: str = "qheads.safetensors",
                                  ignore: tuple[str, ...] = ()) -> str:
    """Run ``argv(out)`` uninterrupted in tmp_path/ref; run it in tmp_path/killed, SIGKILL it at its first checkpoint
    and resume it with ``argv(out, "--resume")``: the resumed run logs the uninterrupted run's metrics at steps
    0…``steps`` (the values of the keys in ``ignore``, such as a throughput, are not compared), saves the same
    ``heads_file`` tensors, and every checkpoint's trainer_state names its step. Returns the resumed run's stdout."""
    import json

    import torch
    from safetensors.torch import load_file

    from chatrlhf.logger import read_metrics
    from chatrlhf.trainers.run import checkpoints

    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = run_cli(*argv(ref))
    assert r.returncode == 0, r.stderr
    killed_at = kill_at_first_checkpoint(argv(out), out)
    assert killed_at < steps
    r = run_cli(*argv(out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"(step {killed_at})" in r.stdout
    want = {m["step"]: m for m in read_metrics(ref)}
    got = {m["step"]: m for m in read_metrics(out)}
    assert sorted(got) == sorted(want) == list(range(steps + 1))
    for step, m in want.items():
        assert got[step].keys() == m.keys(), step
        for k, v in m.items():
            if k not in ignore:
                assert got[step][k] == pytest.approx(v, abs=1e-6), (step, k)
    a, b = load_file(ref / heads_file), load_file(out / heads_file)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for n, path in checkpoints(out):
        assert json.loads((path / "trainer_state.json").read_text())["step"] == n
    return r.stdout


def kill_at_first_checkpoint(args, out, timeout=300) -> int:
    """Start `chatrlhf ARGS`, SIGKILL it as soon as a checkpoint is in ``out``; the step it was killed at."""
    import signal
    import time

    from chatrlhf.trainers.run import checkpoints

    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not checkpoints(out):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return checkpoints(out)[-1][0]


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium() -> str:
    """Debian's Chromium for the Playwright tests: skipped where it is not installed, a failure under CI (.ci/run
    installs it)."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium missing: .ci/run should have installed Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return CHROMIUM


@contextlib.contextmanager
def feedback_app(db, *extra, env=None):
    """`chatrlhf feedback serve --db DB EXTRA` in its own process group on a free port, waited for until /login
    answers; stopped with SIGTERM on exit. Yields {"url"}; its stderr is under "err" once the block is left."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatrlhf.cli", "feedback", "serve", "--db", str(db), "--port",
                             str(port), *map(str, extra)], stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    app = {"url": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(600):
            try:
                httpx.get(app["url"] + "/login", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, f"the feedback app exited: {proc.communicate()[1]}"
                time.sleep(0.05)
        yield app
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        app["err"] = proc.communicate(timeout=30)[1]


def tiny_reward_model(out, *extra):
    """A tiny random-weight reward model fine-tuned for one step (its gate fails), through the real CLI: the classic
    reading (`--recipe full`), which a PPO critic can start from."""
    r = run_cli("reward", "train", "--model", "tiny-random-llama", "--output-dir", out, "--quiet", "--no-tensorboard",
                "--recipe", "full", "--max-steps", "1", *extra)
    assert r.returncode == 0, r.stderr
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def write(tmp_path):
    """write(name, text or bytes) -> path in a temp folder."""
    def _write(name, content):
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return p
    return _write


# A learnable preference for the tiny models (tests/test_dpo.py, test_kto.py): the same reply text ends "Thank you!"
# when it is preferred and "Numbers 0 1 2." when it is not; prompts get a unique suffix, so held-out ones are new.
LEARNABLE_PROMPTS = ["Where is my order?", "Can I change the delivery address?", "What time do you open tomorrow?",
                     "I forgot my password.", "Do you ship to Canada?", "Could you share your order number?"]
LEARNABLE_REPLIES = ["Your package has shipped.", "Please reset it from the sign-in page.",
                     "We open at nine in the morning.", "The refund was issued.",
                     "It should arrive in two to three business days.", "Sure, it is 12345."]


def tiny_sft_args(data, out, *extra):
    return ["sft", "--model", "tiny-random-llama", "--data", data, "--output-dir", out, "--quiet",
            "--no-tensorboard", *extra]


@pytest.fixture(scope="session")
def postgres_url():
    """A real throwaway PostgreSQL server (Debian's binaries, run as the postgres user; .ci/run installs
    them). The tests that use it fail — not skip — in CI when it cannot start."""
    import glob
    import shutil

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or shutil.which("runuser") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries missing: .ci/run should have installed the postgresql package")
        pytest.skip("PostgreSQL not installed (apt-get install -y postgresql)")
    pgbin = Path(bins[-1]).parent
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="chatrlhf-pg-"))  # not under pytest's 0700 tree: postgres must reach it
    shutil.chown(root, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_pg, pgbin / "initdb", "-D", root / "data", "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    port = 55432 + os.getpid() % 1000
    subprocess.run([*as_pg, pgbin / "pg_ctl", "-D", root / "data", "-l", root / "log", "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], check=True,
                   capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute("create database chatrlhf_test")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/chatrlhf_test"
    finally:
        subprocess.run([*as_pg, pgbin / "pg_ctl", "-D", root / "data", "stop", "-m", "fast"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh feedback store on SQLite (a WAL file) and on the real PostgreSQL server."""
    from chatrlhf.feedback.store import Store

    if request.param == "sqlite":
        s = Store(str(tmp_path / "feedback.db"))
    else:
        url = request.getfixturevalue("postgres_url")
        from sqlalchemy import create_engine, text

        eng = create_engine(url)
        with eng.begin() as c:  # a clean schema for every test
            c.execute(text("drop schema public cascade; create schema public"))
        eng.dispose()
        s = Store(url)
    yield s
    s.engine.dispose()
