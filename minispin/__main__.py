"""`python -m minispin ...`: the SPIN iteration driver's command line (same as minispin.driver.main)."""
import sys

from .driver import main

sys.argv[0] = "python -m minispin"  # for the usage line
main()
