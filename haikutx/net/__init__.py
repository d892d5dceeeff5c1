"""
What every product shares on the wire: the address rules, checked client
endpoints, and HTTP/1.1 head parsing.
"""
