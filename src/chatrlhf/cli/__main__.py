"""`python -m chatrlhf.cli`."""

import sys

from chatrlhf.cli import main

sys.exit(main())
