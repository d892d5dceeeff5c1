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
        The handler sent part of its body (it may be held until L{flush}).
        """

    def flush():
        """
        The end of one read of the worker's channel: write the body received
        in it.
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
    Where the job runner keeps its jobs (L{haikutx.jobs.job.Job} values): the
    queue, and every job's last saved state.

    Every method returns a L{Deferred} and never blocks the reactor; a write
    fires only once it is durable. A store may be I{shared} by several
    runners (each with its own C{owner} name): each queued job is then
    claimed by exactly one of them.
    """

    shared = Attribute(
        "C{True} when other runners may use this store at the same time: "
        "runners then keep a lease with L{heartbeat} and take over the jobs "
        "of runners whose lease ran out."
    )

    def open():
        """
        Make the store ready for use (create files, tables).

        @return: a L{Deferred} that fires with C{None}.
        """

    def close():
        """
        Finish pending writes and release the store.

        @return: a L{Deferred} that fires with C{None}.
        """

    def add(job):
        """
        Queue a new job. Jobs added while another commit is under way share
        the next commit.

        @param job: a queued L{haikutx.jobs.job.Job} (its C{seq} is ignored).
        @return: a L{Deferred} that fires with the job as stored (C{seq}
            assigned, later jobs get larger ones) once it is durable.
        """

    def get(job_id):
        """
        The stored job with this id.

        @return: a L{Deferred} that fires with the job, or C{None}.
        """

    def save(job, expected_owner=None):
        """
        Replace the stored job with the same id; a job that is no longer
        stored (evicted) stays gone.

        @param expected_owner: when given, the job is replaced only while
            its stored owner is this one (a runner saving a job another
            runner took over from it changes nothing).
        @return: a L{Deferred} that fires with whether the job was replaced,
            once it is durable.
        """

    def claim(owner, limit, now):
        """
        Take up to C{limit} queued jobs, oldest first: each becomes
        C{running}, owned by C{owner}, started at C{now}. A job is claimed
        by one caller only, whichever runner it is.

        @return: a L{Deferred} that fires with the claimed jobs, oldest first.
        """

    def cancel_queued(job_id, owner, now):
        """
        Finish a job that is still queued, with the error C{"stopped"} at
        C{now}, so that no runner starts it; C{owner} delivers its callback
        (then pending).

        @return: a L{Deferred} that fires with the finished job, or C{None}
            when the job is not queued (unknown, running or finished).
        """

    def recover(owner, lease, now):
        """
        Take over the jobs of runners that are gone: a store that is not
        shared treats every other owner as gone; a shared one, every owner
        whose last L{heartbeat} is older than C{lease} seconds. Their running
        jobs become finished at C{now} with the error C{"interrupted"} (their
        callback pending); those and their
        finished jobs whose callback is still pending become C{owner}'s.

        @return: a L{Deferred} that fires with the jobs taken over (as saved).
        """

    def heartbeat(owner):
        """
        Record that C{owner} is alive now (by the store's clock).

        @return: a L{Deferred} that fires with C{None}.
        """

    def retire(owner):
        """
        Forget C{owner}'s lease: it stopped cleanly.

        @return: a L{Deferred} that fires with C{None}.
        """

    def evict(keep):
        """
        Remove the oldest finished jobs beyond the C{keep} most recent ones.

        @return: a L{Deferred} that fires with the removed ids.
        """

    def listen(on_queued, on_cancel):
        """
        Be told of other runners' events: C{on_queued()} when jobs were
        queued, C{on_cancel(job_id)} when a runner was asked to stop a job.
        A store that is not shared never calls them.
        """

    def request_cancel(job_id):
        """
        Ask every runner listening on this store to stop the job C{job_id}
        if it runs it.

        @return: a L{Deferred} that fires with C{None}.
        """
