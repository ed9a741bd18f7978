"""`python -m chatrlhf`."""

import sys

from chatrlhf.cli import main

sys.exit(main())
