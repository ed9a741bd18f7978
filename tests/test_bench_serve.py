"""benchmarks/serve.py: the percentile its table reports (the servers themselves are measured, not tested)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve as bench  # noqa: E402


def test_pct_nearest_rank_by_hand():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 9.0, 8.0, 7.0, 6.0]   # 1..10 shuffled
    assert bench.pct(xs, 50) == 5.0        # ceil(0.5 × 10) = 5th value
    assert bench.pct(xs, 99) == 10.0       # ceil(9.9) = 10th
    assert bench.pct(xs, 10) == 1.0        # ceil(1.0) = 1st
    assert bench.pct(xs, 11) == 2.0        # ceil(1.1) = 2nd
    assert bench.pct([0.3], 99) == 0.3
    assert bench.pct([], 50) is None


def test_settings_verdict():
    ref = ["I can help", "I can help"]
    assert bench.honoured(ref, ["Sure thing!", "Hmm, maybe"], "I can help")
    assert not bench.honoured(ref, ["I can help", "I can help"], "I can help")    # hot ones decoded greedily
    assert not bench.honoured(ref, ["Sure thing!", "Sure thing!"], "I can help")  # two samples alike: not sampled
    assert not bench.honoured(ref, ["Sure thing!", "Hmm"], "Sure")                # greedy changed by its neighbours
    assert not bench.honoured(["a", "b"], ["x", "y"], "a")                         # greedy not deterministic


def test_a_server_that_dies_is_its_row(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('cannot load the model offline'); sys.exit(3)"]
    row = bench.run_side("peer", crash, bench.free_port(), [], None, {}, None, tmp_path / "peer.log")
    assert set(row) == {"failed"}
    assert "status 3" in row["failed"] and "cannot load the model offline" in row["failed"]
