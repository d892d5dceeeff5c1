"""
The C{haiku} twistd plugin: a pointer to L{haikutx.tap}.
"""

from twisted.application.service import ServiceMaker

Haiku = ServiceMaker(
    "haikutx",
    "haikutx.tap",
    "A multi-tenant runtime for small HTTP web APIs, with a job runner and a gate.",
    "haiku",
)
