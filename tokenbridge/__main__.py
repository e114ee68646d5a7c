"""``python -m tokenbridge`` runs the ``tokenbridge`` command."""

import sys

from tokenbridge.cli import main

sys.exit(main())
