"""`--num-processes N`: the same command in N data-parallel processes on this machine, started by PyTorch's own
launcher (torchrun's ``run``, in this process) — one GPU each where there are GPUs, gloo on CPU; the processes
join through accelerate's ``PartialState`` in the run scaffold (trainers/run.py), and with --fsdp shard the model
(docs/distributed.md). Several machines: ``accelerate launch`` (README, "Several processes"; docs/distributed.md)."""

from __future__ import annotations

import logging
import os

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def relaunch(argv: list[str], processes: int, log=print) -> int:
    """Run ``chatrlhf ARGV`` in ``processes`` processes (a free port on localhost for them to meet); returns the
    exit status — a failed rank's own, so a usage error is 2 as in one process. The ranks print their own
    errors; the launcher's report of a failed child (a traceback of the launcher) is not printed again."""
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # torch threads per process: the machine's cores shared out (torchrun's default would be 1, with a warning)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    log(f"chatrlhf: {processes} processes (torchrun --standalone --nproc-per-node {processes})", flush=True)
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(processes), "--module", "chatrlhf", *argv]))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0]
        return min(codes) if codes else 1
    return 0
