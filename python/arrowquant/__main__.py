"""`python -m arrowquant`: the same command line as the `arrowquant` script."""

import sys

from .cli import main

sys.exit(main())
