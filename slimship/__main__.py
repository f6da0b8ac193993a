"""`python -m slimship`: the `slimship` command."""

import sys

from slimship.cli import main

sys.exit(main())
