"""``python -m orchestrator``: the ``smn`` command line."""

import sys

from orchestrator.cli.app import main

sys.exit(main())
