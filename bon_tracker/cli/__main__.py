"""``python -m bon_tracker.cli``: the ``bon-tracker`` command."""

import sys

from bon_tracker.cli.main import main

sys.exit(main())
