"""python -m fastreg.eval: see fastreg.eval.cli."""

import sys

from fastreg.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
