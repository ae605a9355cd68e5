"""python -m smartmixed.train == smartmixed-train."""

import sys

from smartmixed.train.cli import main

sys.exit(main())
