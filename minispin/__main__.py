"""`python -m minispin ...`: the SPIN iteration driver's command line (minispin.cli.main)."""
import sys

from .cli import main

sys.argv[0] = "python -m minispin"  # for the usage line
main()
