"""`python -m minispin.demo`: the built-in demo (see minispin.demo.run)."""
import sys

from .run import main

sys.exit(main())
