# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
The seams of haikutx, as zope interfaces.
"""

from __future__ import annotations

from zope.interface import Interface


class IJobStore(Interface):
    """
    Durable storage of job runner jobs (L{haikutx.jobstore.Job} values).

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
            L{haikutx.jobstore.Job}.
        """

    def save(job):
        """
        Insert C{job}, or replace the stored job with the same id.

        @param job: a L{haikutx.jobstore.Job}.
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
