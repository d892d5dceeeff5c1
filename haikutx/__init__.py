"""
haikutx: a multi-tenant runtime for small HTTP web APIs, built on Twisted.
"""

#: The version of haikutx; pyproject.toml reads it from here.
__version__ = "0.1.0"
