"""``python -m softmask`` (and ``torchrun -m softmask``) runs the command line."""

import sys

from softmask.cli import main

sys.exit(main())
