import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args, timeout=600, env=None, **kw):
    """Run the real `chatrlhf` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "chatrlhf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


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


def tiny_sft_args(data, out, *extra):
    return ["sft", "--model", "tiny-random-llama", "--data", data, "--output-dir", out, "--quiet",
            "--no-tensorboard", *extra]
