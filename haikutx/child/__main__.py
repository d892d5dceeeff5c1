"""
Entry point of a worker slot: C{python -m haikutx.child OPTIONS}, a zygote
that forks a sandboxed child at a time (L{haikutx.child.zygote}).
"""

import sys

from haikutx.child.zygote import main

main(sys.argv)
