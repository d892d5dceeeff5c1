"""
The gate: an HTTP front door forwarding C{/<port>/...} and C{/<app>/...} to
local application servers, starting applications on demand.
"""
