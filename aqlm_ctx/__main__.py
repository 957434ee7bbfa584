"""``python -m aqlm_ctx inspect PATH``."""

import sys

from .cli import main

sys.exit(main())
