"""`python -m minispin.demo`: SPIN on a real chat model (minispin.demo.chat). The toy task demo, its plateau
regime and its seeds study: `python -m minispin.demo.toy`."""
import sys

from .chat import main

if __name__ == "__main__":
    sys.exit(main())
