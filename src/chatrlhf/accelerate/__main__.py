"""``python -m chatrlhf.accelerate [NAME]``: the path of a shipped accelerate config (every one without NAME)."""

from __future__ import annotations

import sys

from chatrlhf.accelerate import CONFIGS, config_path


def main(argv: list[str]) -> int:
    if not argv:
        for name in CONFIGS:
            print(f"{name:16} {config_path(name)}")
        return 0
    if argv[0] not in CONFIGS or len(argv) > 1:
        print(f"usage: python -m chatrlhf.accelerate [{'|'.join(CONFIGS)}]", file=sys.stderr)
        return 2
    print(config_path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
