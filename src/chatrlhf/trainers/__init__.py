"""Training loops, one per method; each reads top to bottom in its own file. Math lives in losses.py, the run's
plumbing (output folder, logging, checkpoints and exact resume, Ctrl-C, progress, summary) in run.py."""
