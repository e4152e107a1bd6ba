"""`python -m minispin ...`: the SPIN iteration driver's command line (same as minispin.spin.main)."""
import sys

from .spin import main

sys.argv[0] = "python -m minispin"  # for the usage line
main()
