"""`python -m resunet ...` (and `torchrun -m resunet train ...`)."""

import sys

from .cli import main

sys.exit(main())
