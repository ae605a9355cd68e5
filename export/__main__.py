"""python -m smartmixed.export == smartmixed-export."""

import sys

from smartmixed.export.cli import main

sys.exit(main())
