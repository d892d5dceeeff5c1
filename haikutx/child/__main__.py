"""
Entry point of a worker slot: C{python -m haikutx.child MAX_REQUESTS OPTIONS},
a zygote that forks a sandboxed child per process lifetime.
"""

import sys

from haikutx.child.zygote import main

main(sys.argv)
