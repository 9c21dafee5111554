"""python -m pprt.generate: a shim for pprt.entrypoints.generate, where the CLI lives."""

import sys

from pprt.entrypoints.generate import main

if __name__ == "__main__":
    sys.exit(main())
