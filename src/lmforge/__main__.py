"""``python -m lmforge`` (used by torchrun for distributed training)."""

import sys

from lmforge.cli import main

sys.exit(main())
