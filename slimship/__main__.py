"""`python -m slimship`: the slimship command."""

import sys

from slimship._entry import main

sys.exit(main())
