"""One logger: JSONL (``metrics.jsonl``) and TensorBoard, keys namespaced (``train/``, ``eval/``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

# rich at the top, not inside progress_bar: importing it draws from Python's global RNG, which must not move after
# a checkpoint's RNG state was restored (a resumed run would no longer repeat the uninterrupted one)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from chatrlhf.config import config_dict


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            truncate_jsonl(self.path, resume_step)  # what the interrupted run logged after its checkpoint
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step)

    def config(self, cfg) -> None:
        """The run's full config, written at start as run_config.json (config.json is the saved model's)."""
        d = config_dict(cfg)
        (self.dir / "run_config.json").write_text(json.dumps(d, indent=2) + "\n")
        if self.tb:
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in d.items()), 0)

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def table(self, step: int, name: str, rows: list[dict]) -> None:
        """A table (e.g. sample replies with their rewards) as markdown text in TensorBoard."""
        if self.tb and rows:
            cols = list(rows[0])
            md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            md += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |" for r in rows]
            self.tb.add_text(name, "\n".join(md), step)

    def close(self) -> None:
        if self.tb:
            self.tb.flush()
            self.tb.close()


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep the lines of a JSON-lines log up to ``step`` (a resumed run drops what the interrupted run wrote
    after its last checkpoint)."""
    path = Path(path)
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(quiet: bool):
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=quiet, transient=False)
