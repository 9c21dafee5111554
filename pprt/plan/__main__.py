"""python -m pprt.plan: the thin entry module (the CLI is pprt.entrypoints.plan_cli)."""

import sys

from pprt.entrypoints.plan_cli import main

sys.exit(main())
