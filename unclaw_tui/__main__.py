"""`python -m unclaw_tui`: the same as the `unclaw-tui` command."""

import sys

from unclaw_tui.cli import main

sys.exit(main())
