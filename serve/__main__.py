"""python -m smartmixed.serve == smartmixed-serve."""

import sys

from smartmixed.serve.cli import main

sys.exit(main())
