# -*- test-case-name: haikutx.test.test_interfaces -*-
"""
The extension points of haikutx, as zope interfaces.
"""

from zope.interface import Attribute, Interface


class IWorkerSpawner(Interface):
    """
    Starts worker processes for the pool.
    """

    def spawn(protocol, max_requests):
        """
        Start one worker process connected to C{protocol}.

        @param protocol: a L{haikutx.runtime.worker.WorkerProtocol}; the
            spawner connects it to the zygote's process and channel
            (C{protocol.zygote_connected}).
        @param max_requests: requests a child serves; the pool enforces it
            (a child is never trusted to), so a spawner may ignore it.
        """


class IExchange(Interface):
    """
    The runtime's side of one request in a worker: it receives the response.
    """

    def head(status, headers):
        """
        The handler sent its status and its headers (C{[name, value]} pairs).
        """

    def data(data):
        """
        The handler sent part of its body.
        """

    def finish(trailers):
        """
        The handler ended its response (trailers as C{[name, value]} pairs).
        """

    def fail(status, message):
        """
        The runtime answers for the handler: it raised or did not compile.
        """

    def lost(reason):
        """
        The worker process is gone; C{reason} names why.
        """


class IHandlerLoader(Interface):
    """
    Finds a handler's code from the name a request gives.
    """

    def load(name):
        """
        Load the handler C{name} (an http/https URL or a relative name).

        @return: a L{Deferred} firing with a L{haikutx.runtime.loader.HandlerSource},
            or failing with L{haikutx.runtime.loader.HandlerLoadError}.
        """


class ILanguage(Interface):
    """
    A handler language (SPEC §3.3), found with C{twisted.plugin.getPlugins}
    in L{haikutx.plugins}.
    """

    name = Attribute("The language's name, as x-haiku-language gives it.")
    aliases = Attribute("Other names x-haiku-language accepts (a tuple of str).")
    extensions = Attribute("File extensions (with the dot) of its handlers.")
    interpreters = Attribute(
        "Program names that name it on a #! line (a tuple of str)."
    )
    runner = Attribute(
        "How the worker runs it: C{'python'} (in the worker) or C{'stdio'} "
        "(an interpreter process: body on stdin, response on stdout)."
    )

    def interpreter():
        """
        The absolute path of the interpreter this language runs, or C{None}
        when it is not installed (the worker's own Python for C{'python'}).
        """

    def is_available():
        """
        Whether handlers in this language can run on this machine.
        """

    def argv(source):
        """
        The command line that runs C{source} (the handler's code, passed as
        an argument: the sandbox forbids writing it to a file).

        @param source: the handler's code (bytes).
        @return: a list of str, or C{None} for the C{'python'} runner.
        @raise ValueError: when the code cannot be passed (NUL bytes).
        """


class IHandlerFetcher(Interface):
    """
    Obtains handler code from http and https URLs.
    """

    def fetch(url):
        """
        Fetch the handler at C{url}, following redirects, through the cache.

        @param url: an absolute http or https URL.
        @return: a L{Deferred} firing with a L{haikutx.runtime.fetch.FetchedHandler},
            or failing with L{haikutx.runtime.fetch.HandlerFetchError}.
        """

    def counters():
        """
        The fetcher's counters, for C{GET /_haiku/status}.

        @return: a C{dict} of C{hits}, C{misses}, C{revalidations}, C{bytes}
            (downloaded from origins) and C{errors}.
        """


class IJobStore(Interface):
    """
    Durable storage of job runner jobs (L{haikutx.jobs.store.sqlite.Job} values).

    The job runner keeps the live copy of every job in memory; the store is
    the copy that survives a restart. Every method returns a L{Deferred}
    and never blocks the reactor.
    """

    def open():
        """
        Make the store ready for use (create files, tables).

        @return: a L{Deferred} that fires with C{None}.
        """

    def load():
        """
        Every stored job, oldest first (in the order they were saved first).

        @return: a L{Deferred} that fires with a L{list} of
            L{haikutx.jobs.store.sqlite.Job}.
        """

    def save(job):
        """
        Insert C{job}, or replace the stored job with the same id.

        @param job: a L{haikutx.jobs.store.sqlite.Job}.
        @return: a L{Deferred} that fires with C{None} once it is stored.
        """

    def remove(job_ids):
        """
        Forget the jobs with these ids; unknown ids are ignored.

        @param job_ids: a sequence of job ids.
        @return: a L{Deferred} that fires with C{None}.
        """

    def close():
        """
        Finish pending writes and release the store.

        @return: a L{Deferred} that fires with C{None}.
        """
