"""`python -m houndd` is the `houndd` command."""

import sys

from houndd.cli import main

sys.exit(main())
