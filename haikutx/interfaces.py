# -*- test-case-name: haikutx.test.test_fetch -*-
"""
The extension points of haikutx, as zope interfaces.
"""

from zope.interface import Interface


class IHandlerFetcher(Interface):
    """
    Obtains handler code from http and https URLs.
    """

    def fetch(url):
        """
        Fetch the handler at C{url}, following redirects, through the cache.

        @param url: an absolute http or https URL.
        @return: a L{Deferred} firing with a L{haikutx.fetch.FetchedHandler},
            or failing with L{haikutx.fetch.HandlerFetchError}.
        """

    def counters():
        """
        The fetcher's counters, for C{GET /_haiku/status}.

        @return: a C{dict} of C{hits}, C{misses}, C{revalidations}, C{bytes}
            (downloaded from origins) and C{errors}.
        """
