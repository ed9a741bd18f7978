"""Training loops, one per method; each reads top to bottom. Math lives in losses.py."""
