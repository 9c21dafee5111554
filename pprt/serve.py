"""python -m pprt.serve: the OpenAI-compatible HTTP server (it lives in pprt.entrypoints.serve)."""

import sys

from pprt.entrypoints.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
