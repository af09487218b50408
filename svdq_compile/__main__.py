"""``python -m svdq_compile`` is the ``svdq-compile`` command."""

import sys

from .cli import main

sys.exit(main())
