"""python -m smartmixed.bench == smartmixed-bench."""

import sys

from smartmixed.bench.cli import main

sys.exit(main())
