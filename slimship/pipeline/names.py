"""What a release name and version look like: one definition for config validation and release.py."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.]+)?$")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters"
VERSION_RULE = "MAJOR.MINOR.PATCH, e.g. 1.2.3 or 1.2.3-rc1"
