"""``python -m skillhub`` is the ``skillhub`` command."""

import sys

from skillhub.cli import main

sys.exit(main())
