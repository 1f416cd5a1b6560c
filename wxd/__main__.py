"""`python -m wxd` runs the command-line interface."""

from __future__ import annotations

import sys

from wxd.cli import main

sys.exit(main())
