"""``python -m curvature``: the ``curvature`` command (what ``torchrun -m curvature`` starts)."""

import sys

from curvature.cli.main import main

sys.exit(main())
