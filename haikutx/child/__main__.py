"""
Entry point of a worker process: C{python -m haikutx.child MAX_REQUESTS}.
"""

import sys

from haikutx.child.runner import main

main(sys.argv)
