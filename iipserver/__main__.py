"""``python -m iipserver``: the ``iipserver`` command."""

import sys

from iipserver.cli import main

sys.exit(main())
