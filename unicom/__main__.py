"""``python -m unicom``: the ``unicom`` command (embed, index, search, dedup)."""

import sys

from .cli import main

sys.exit(main())
