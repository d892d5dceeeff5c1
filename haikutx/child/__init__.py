"""
The worker process that runs handlers (standard library only).
"""
