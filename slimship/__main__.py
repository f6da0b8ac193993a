"""`python -m slimship ...`: the same as the `slimship` command."""

import sys

from slimship.cli import main

sys.exit(main())
