"""
The job runner: whitelisted commands started over a JSON API, kept in a
durable store, with callbacks on completion.
"""
