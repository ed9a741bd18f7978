"""Hot swap under load: `chatrlhf serve` on the embedded SmolLM2-135M, C streaming `openai` clients asking back to
back, and `POST /admin/reload` of the same model folder (under another name) in the middle. Prints how long the
reload took (loading included), the longest gap between two tokens of a stream before and during the swap, the
requests that completed or failed, and which model answered those that started after the switch.

    .venv/bin/python benchmarks/serve_swap.py --clients 4 --seconds 12 --max-tokens 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

from chatrlhf.models import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, start, stop  # noqa: E402

ADMIN = "bench-admin-key-0123456789"
MSG = [{"role": "user", "content": "Where is my order? It was due on Monday."}]


def client_loop(url: str, until: float, a, results: list) -> None:
    """Streaming requests one after another until ``until``: (start, end, model, token times or an error)."""
    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    while time.perf_counter() < until:
        t0, times, model = time.perf_counter(), [], None
        try:
            for ch in c.chat.completions.create(model="bench", messages=MSG, max_tokens=a.max_tokens, temperature=0.7,
                                                stream=True, extra_body={"ignore_eos": True}):
                model = ch.model
                if ch.choices and ch.choices[0].delta.content:
                    times.append(time.perf_counter())
            results.append((t0, time.perf_counter(), model, times))
        except Exception as e:  # noqa: BLE001 - counted as a lost request
            results.append((t0, time.perf_counter(), None, f"{type(e).__name__}: {e}"))


def max_gap(results: list, lo: float, hi: float) -> float:
    """The longest gap between consecutive tokens of one stream, for gaps that end within [lo, hi)."""
    gaps = [b - a for *_, times in results if isinstance(times, list) for a, b in zip(times, times[1:]) if lo <= b < hi]
    return max(gaps, default=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=12.0, help="how long the clients ask; the reload is at a third")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args()
    folder = str(resolve_model("smollm2-135m"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp()) / "serve.log"
    proc = start([sys.executable, "-m", "chatrlhf.cli", "serve", "--model", folder, "--model-name", "bench",
                  "--port", str(port), "--dtype", a.dtype, "--admin-key", ADMIN], port, log)
    try:
        results: list = []
        t_start = time.perf_counter()
        until = t_start + a.seconds
        threads = [threading.Thread(target=client_loop, args=(url, until, a, results)) for _ in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(a.seconds / 3)
        t0 = time.perf_counter()
        r = httpx.post(url + "/admin/reload", json={"model": folder, "name": "bench-2"},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
        t1 = time.perf_counter()
        for t in threads:
            t.join()
    finally:
        stop(proc)
    failed = [x for x in results if not isinstance(x[3], list)]
    after = [x for x in results if x[0] > t1 and isinstance(x[3], list)]
    print(f"reload: HTTP {r.status_code} in {t1 - t0:.2f} s -> {r.json().get('model')}")
    print(f"requests: {len(results)} completed or failed, {len(failed)} failed {failed[:2]}")
    print(f"longest token gap: before the reload {max_gap(results, t_start, t0) * 1000:.0f} ms, "
          f"during it {max_gap(results, t0, t1 + 0.5) * 1000:.0f} ms")
    print(f"started after the switch: {len(after)}, answered by {sorted({x[2] for x in after})}")


if __name__ == "__main__":
    main()
