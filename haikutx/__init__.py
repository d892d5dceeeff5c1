"""
haikutx: a multi-tenant runtime for small HTTP web APIs, built on Twisted.
"""
