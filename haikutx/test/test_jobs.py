# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Tests for L{haikutx.jobs.runner}: pure parts on Clock, the API and the runner on
real processes and sockets, and a real restart of C{twistd haiku}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from haikutx.config import Config
from haikutx.jobs.api import JobsResource, job_site, parse_job_request, split_args
from haikutx.jobs.callbacks import CallbackRefused, check_callback_url, deliver_callback
from haikutx.jobs.ends import final_state
from haikutx.jobs.job import CallbackOutcome, Job
from haikutx.jobs.process import OutputBuffer
from haikutx.jobs.request import JobRefused
from haikutx.jobs.runner import JobRunner
from haikutx.jobs.service import JobService, command_user, with_backlog
from haikutx.net.addresses import AddressRules
from haikutx.net.outbound import AddressRefused
from haikutx.service import build_service
from haikutx.test.strategies import loopback_hosts, non_public_hosts
from haikutx.testing import MemoryJobStore

_ROOT = Path(__file__).resolve().parents[2]


class SplitArgsTests(SynchronousTestCase):
    """
    L{split_args} turns C{args} into an argument list.
    """

    @given(
        st.lists(st.text(alphabet="abc-./", min_size=1), max_size=5), st.text(" \t\n", min_size=1)
    )
    def test_string(self, words, space) -> None:
        """
        A string is split on runs of white space, with no empty arguments.
        """
        self.assertEqual(split_args(space + space.join(words) + space), words)

    def test_list(self) -> None:
        """
        A list is taken as is (spaces kept); C{None} is no arguments.
        """
        self.assertEqual(split_args(["a b", "", "c"]), ["a b", "", "c"])
        self.assertEqual(split_args(None), [])

    def test_bad(self) -> None:
        """
        Other types are refused.
        """
        for bad in (1, {"a": 1}, ["a", 2]):
            self.assertRaises(JobRefused, split_args, bad)


class ParseJobRequestTests(SynchronousTestCase):
    """
    L{parse_job_request} reads a C{POST /} body or says what is wrong.
    """

    def test_good(self) -> None:
        """
        Command, split args and callback come out.
        """
        self.assertEqual(
            parse_job_request(b'{"command": "echo", "args": "a  b", "callback": "http://x/"}'),
            ("echo", ["a", "b"], "http://x/"),
        )

    def test_errors(self) -> None:
        """
        Invalid JSON, a non-object, a missing or non-string command and a
        non-string callback each give their own message.
        """
        cases = {
            b"{bad": "invalid JSON",
            b"\xff": "not UTF-8",
            b"null": "JSON object",
            b"[]": "JSON object",
            b"{}": "command is missing",
            b'{"command": 3}': "non-empty string",
            b'{"command": ""}': "non-empty string",
            b'{"command": "echo", "callback": 1}': "callback must be a string",
        }
        for body, message in cases.items():
            e = self.assertRaises(JobRefused, parse_job_request, body)
            self.assertIn(message, str(e))


class CallbackURLTests(SynchronousTestCase):
    """
    L{check_callback_url} applies the shared address rules to callbacks.
    """

    @given(non_public_hosts())
    def test_non_public_refused(self, case) -> None:
        """
        A callback naming a non-public address, in any spelling, is refused
        before the job is accepted.
        """
        host, _ = case
        self.assertRaises(
            CallbackRefused, check_callback_url, f"http://{host}:8080/cb", AddressRules()
        )

    @given(loopback_hosts)
    def test_allowed_by_prefix(self, host) -> None:
        """
        An C{--allow} prefix naming the host lifts the rule, IPv6 literals
        included.
        """
        url = f"http://{host}:8080/cb"
        rules = AddressRules.from_prefixes([f"http://{host}:8080/"])
        self.assertEqual(check_callback_url(url, rules).port, 8080)

    def test_urls(self) -> None:
        """
        Non-http URLs and bad ports are refused; host names pass (they are
        checked when connecting); a public address passes.
        """
        rules = AddressRules()
        for url in ("ftp://example.com/", "http://h:99999/", "http://u@example.com/", "x"):
            self.assertRaises(CallbackRefused, check_callback_url, url, rules)
        self.assertEqual(check_callback_url("http://localhost/", rules).host, "localhost")
        self.assertEqual(check_callback_url("https://93.184.216.34/x", rules).port, 443)
        e = self.assertRaises(CallbackRefused, check_callback_url, "http://[::7f00:1]/", rules)
        self.assertIn("loopback", str(e))

    def test_same_rules_as_handlers(self) -> None:
        """
        With C{--allow} prefixes, a callback must match one, as a handler
        URL must.
        """
        rules = AddressRules.from_prefixes(["https://hooks.example.com/"])
        self.assertRaises(CallbackRefused, check_callback_url, "https://other.example.com/", rules)
        check_callback_url("https://hooks.example.com/job", rules)


class OutputBufferTests(SynchronousTestCase):
    """
    L{OutputBuffer} keeps the most recent bytes.
    """

    @given(st.lists(st.binary(max_size=50), max_size=20), st.integers(1, 100))
    def test_tail(self, chunks, limit) -> None:
        """
        The buffer holds the last C{limit} bytes and says when it dropped any.
        """
        buffer = OutputBuffer(limit)
        for chunk in chunks:
            buffer.append(chunk)
        everything = b"".join(chunks)
        self.assertEqual(bytes(buffer.data), everything[-limit:] if everything else b"")
        self.assertEqual(buffer.truncated, len(everything) > limit)


class CommandUserTests(SynchronousTestCase):
    """
    L{command_user} picks who commands run as.
    """

    def test_user(self) -> None:
        """
        Not root: unchanged. Root: C{nobody} by default, C{root} keeps root.
        """
        import pwd

        nobody = pwd.getpwnam("nobody")
        self.assertEqual(command_user("nobody", euid=1000), (None, None))
        self.assertEqual(command_user(None, euid=0), (nobody.pw_uid, nobody.pw_gid))
        self.assertEqual(command_user("root", euid=0), (None, None))
        self.assertRaises(KeyError, command_user, "no-such-user-xyz", euid=0)


class LauncherUserTests(SynchronousTestCase):
    """
    The launcher becomes the jobs' user only when this process can (root).
    """

    def test_root_switches(self) -> None:
        from haikutx.jobs import spawn

        self.patch(spawn.os, "geteuid", lambda: 0)
        launcher = spawn.LauncherSpawner(Clock(), uid=65534, gid=65533)
        self.assertTrue(launcher.switches_user)
        self.assertEqual(launcher._user[:2], ["65534", "65533"])

    def test_not_root_keeps_the_old_way(self) -> None:
        from haikutx.jobs import spawn

        self.patch(spawn.os, "geteuid", lambda: 1000)
        launcher = spawn.LauncherSpawner(Clock(), uid=65534, gid=65533)
        self.assertFalse(launcher.switches_user)
        self.assertEqual(launcher._user, [])


class _LauncherReactor(Clock):
    """
    A clock that records the launcher processes it is asked to spawn (a
    fake: what is tested is when the spawner starts one, not the process).
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, protocol: Any, *args: Any, **kwargs: Any) -> Any:
        self.spawned.append(protocol)
        transport = StringTransport()
        transport.pid = 1000 + len(self.spawned)  # type: ignore[attr-defined]
        transport.pipes = {}  # type: ignore[attr-defined]
        transport.closeStdin = lambda: None  # type: ignore[attr-defined]
        transport.signalProcess = lambda name: None  # type: ignore[attr-defined]
        return transport


class LauncherRestartTests(SynchronousTestCase):
    """
    A launcher that ends is started again: at once after a long run, after
    a wait that doubles (0.1 s up to 5 s) when it ends soon after its start,
    so that one that cannot start, or that jobs kill again and again, is
    not restarted in a tight loop.
    """

    def _spawner(self) -> tuple[_LauncherReactor, Any]:
        from haikutx.jobs import spawn

        reactor = _LauncherReactor()
        launcher = spawn.LauncherSpawner(reactor)
        launcher.start()
        return reactor, launcher

    def _end(self, reactor: _LauncherReactor) -> None:
        reactor.spawned[-1].processEnded(Failure(ProcessTerminated(1)))

    def test_quick_ends_wait_longer(self) -> None:
        reactor, launcher = self._spawner()
        waits = []
        for _ in range(8):
            self._end(reactor)
            started = len(reactor.spawned)
            (restart,) = reactor.getDelayedCalls()
            wait = restart.getTime() - reactor.seconds()
            reactor.advance(wait - 0.001)
            self.assertEqual(len(reactor.spawned), started)
            reactor.advance(0.002)
            self.assertEqual(len(reactor.spawned), started + 1)
            waits.append(round(wait, 3))
        self.assertEqual(waits, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])

    def test_long_run_restarts_at_once(self) -> None:
        from haikutx.jobs import spawn

        reactor, launcher = self._spawner()
        self._end(reactor)
        reactor.advance(0.1)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.advance(spawn.RESTART_STABLE)
        self._end(reactor)
        self.assertEqual(len(reactor.spawned), 3)

    def test_asked_meanwhile(self) -> None:
        """
        What is asked of the launcher while it waits to be started again (a
        command's look-up, a job's start) is asked of it once it is.
        """
        reactor, launcher = self._spawner()
        self._end(reactor)
        found = launcher.which("true", "/bin")
        started = launcher(object(), "/bin/true", ["true"], {})
        self.assertNoResult(found)
        self.assertNoResult(started)
        sent: list[tuple[Any, ...]] = []
        self.patch(launcher, "_send", sent.append)
        reactor.advance(0.1)
        self.assertEqual(len(reactor.spawned), 2)
        self.assertEqual(
            [message[0] for message in sent], ["which", "env", "start"]
        )
        launcher._received(("found", sent[0][1], "/bin/true"))
        self.assertEqual(self.successResultOf(found), "/bin/true")

    def test_cannot_be_started(self) -> None:
        """
        A launcher that cannot be started again (no process can be made)
        fails what waited for it, and is tried again after a longer wait.
        """
        reactor, launcher = self._spawner()
        self._end(reactor)
        started = launcher(object(), "/bin/true", ["true"], {})
        spawn = reactor.spawnProcess

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise OSError(11, "Resource temporarily unavailable")

        reactor.spawnProcess = refuse  # type: ignore[method-assign]
        reactor.advance(0.1)
        self.failureResultOf(started, OSError)
        (restart,) = reactor.getDelayedCalls()
        self.assertAlmostEqual(restart.getTime() - reactor.seconds(), 0.2)
        reactor.spawnProcess = spawn  # type: ignore[method-assign]
        reactor.advance(0.2)
        self.assertEqual(len(reactor.spawned), 2)

    def test_stopped_meanwhile(self) -> None:
        """
        Stopping the spawner while its launcher waits to be started again
        cancels the start, and what was asked meanwhile fails.
        """
        reactor, launcher = self._spawner()
        self._end(reactor)
        started = launcher(object(), "/bin/true", ["true"], {})
        self.successResultOf(launcher.stop())
        self.failureResultOf(started, OSError)
        self.assertRaises(OSError, launcher, object(), "/bin/true", ["true"], {})
        reactor.advance(10)
        self.assertEqual(len(reactor.spawned), 1)


class LauncherHoldTests(SynchronousTestCase):
    """
    The launcher reports a job's start with what follows within
    L{launcher.HOLD} seconds (a short job: start, output and end in one
    write), and alone when nothing follows in time. The launcher's loop runs
    in a thread of the test, on pipes of the test's own.
    """

    def _launch(self, hold: float, script: str, until: str | None = None) -> list[str]:
        """
        Start C{sh -c script} in a launcher holding starts for C{hold}
        seconds; the kinds of the reports of the first write it makes (with
        C{until}: of its writes until one brings a report of that kind, one
        list per write, at most 20 s).
        """
        import marshal
        import select
        import threading

        from haikutx.jobs import launcher

        self.patch(launcher, "HOLD", hold)
        commands_r, commands_w = os.pipe()
        reports_r, reports_w = os.pipe()
        thread = threading.Thread(
            target=launcher.Launcher(commands_r, reports_w).run, daemon=True
        )
        thread.start()

        def stop() -> None:
            os.close(commands_w)
            thread.join(10)
            for fd in (commands_r, reports_r, reports_w):
                os.close(fd)

        self.addCleanup(stop)
        for message in (
            ("env", {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}),
            ("start", 1, shutil.which("sh"), ["sh", "-c", script]),
        ):
            body = marshal.dumps(message)
            os.write(commands_w, launcher.HEADER.pack(len(body)) + body)
        writes: list[list[str]] = []
        for _ in range(20):
            ready, _, _ = select.select([reports_r], [], [], 20)
            self.assertTrue(ready, "no report within 20 s")
            data = os.read(reports_r, 65536)
            kinds = []
            while data:
                (length,) = launcher.HEADER.unpack_from(data)
                kinds.append(marshal.loads(data[4 : 4 + length])[0])
                data = data[4 + length :]
            if until is None:
                return kinds
            writes.append(kinds)
            if until in kinds:
                break
        return writes

    def test_short_job_one_write(self) -> None:
        """
        A job that ends within the hold: its start, output and end are one
        write.
        """
        self.assertEqual(self._launch(30.0, "sleep 0.2; echo x"), ["started", "out", "ended"])

    def test_output_waits_for_end(self) -> None:
        """
        The output of a job started in the hold waits with its start for its
        end: one write, though the output came well before the end.
        """
        self.assertEqual(self._launch(30.0, "echo x; sleep 0.3"), ["started", "out", "ended"])

    def test_output_after_hold(self) -> None:
        """
        A job that writes and goes on running past the hold: its output is
        reported once the hold is over, without waiting for its end.
        """
        writes = self._launch(0.05, "echo x; sleep 5", until="out")
        reported = [kind for kinds in writes for kind in kinds]
        self.assertEqual(reported, ["started", "out"])

    def test_start_alone_after_hold(self) -> None:
        """
        A job still running when the hold is over: its start is reported
        alone, before its end.
        """
        self.assertEqual(self._launch(0.05, "sleep 2"), ["started"])


class LauncherDeathTests(SynchronousTestCase):
    """
    The launcher (a real process, its parent this test) takes every job it
    started with it when told to go, however the signals fall.
    """

    def test_sigterms_during_the_kill(self) -> None:
        """
        SIGTERMs that keep coming while the launcher kills its jobs (the
        parent-death signal arrives while it is already going because its
        pipe closed, or again) interrupt nothing: no job is left running.
        Three rounds of 200 jobs (a launcher that a SIGTERM could interrupt
        left some running in most rounds).
        """
        for _ in range(3):
            self.assertEqual(self._left_running(200), [])

    def _left_running(self, count: int) -> list[str]:
        """
        Start C{count} jobs in a launcher, close its pipe and send it
        SIGTERMs until it has exited: the jobs still running then.
        """
        import marshal
        import select
        import time

        from haikutx.jobs import launcher
        from haikutx.jobs.spawn import LAUNCHER

        child = subprocess.Popen(
            [sys.executable, "-I", LAUNCHER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={},
        )
        self.addCleanup(child.wait, 10)
        self.addCleanup(_kill_quietly, child.pid)
        self.addCleanup(child.stdout.close)
        messages = [("env", {"PATH": "/usr/bin:/bin"})] + [
            ("start", n, shutil.which("sleep"), ["sleep", "60"]) for n in range(1, count + 1)
        ]
        for message in messages:
            body = marshal.dumps(message)
            child.stdin.write(launcher.HEADER.pack(len(body)) + body)
        child.stdin.flush()
        pids: list[int] = []
        data = b""
        deadline = time.monotonic() + 20
        while len(pids) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], 1)
            if ready:
                data += os.read(child.stdout.fileno(), 65536)
            while len(data) >= 4 and len(data) >= 4 + launcher.HEADER.unpack_from(data)[0]:
                (length,) = launcher.HEADER.unpack_from(data)
                report = marshal.loads(data[4 : 4 + length])
                data = data[4 + length :]
                if report[0] == "started":
                    pids.append(report[2])
                    self.addCleanup(_kill_quietly, report[2])
        self.assertEqual(len(pids), count)
        # Its pipe closes and SIGTERMs follow, as fast as they can be sent,
        # until it has exited (at most 2 s).
        child.stdin.close()
        deadline = time.monotonic() + 2
        while child.poll() is None and time.monotonic() < deadline:
            try:
                os.kill(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        child.wait(10)
        for _ in range(100):
            left = [pid for pid in pids if _alive(pid)]
            if not left:
                break
            time.sleep(0.05)
        return [_where(pid) for pid in left]


class FinalStateTests(SynchronousTestCase):
    """
    L{final_state} names the C{haiku_jobs_total} state of a finished job.
    """

    def test_states(self) -> None:
        """
        Exit 0 is finished, a non-zero exit, a signal or an error failed,
        stopped is deleted, interrupted is interrupted.
        """

        def job(**kw):
            return Job(id="a" * 40, seq=1, command="x", arguments=(), state="finished", **kw)

        self.assertEqual(final_state(job(code=0)), "finished")
        self.assertEqual(final_state(job(code=1)), "failed")
        self.assertEqual(final_state(job(signal="SIGKILL")), "failed")
        self.assertEqual(final_state(job(error="timeout", signal="SIGTERM")), "failed")
        self.assertEqual(final_state(job(error="stopped", signal="SIGTERM")), "deleted")
        self.assertEqual(final_state(job(error="interrupted")), "interrupted")


class BacklogTests(SynchronousTestCase):
    """
    L{with_backlog} gives TCP listeners a long accept queue.
    """

    def test_backlog(self) -> None:
        """
        TCP and TLS descriptions get C{backlog=1024} unless they set one;
        others are left alone.
        """
        self.assertEqual(
            with_backlog("tcp:9000:interface=127.0.0.1"),
            "tcp:9000:interface=127.0.0.1:backlog=1024",
        )
        self.assertEqual(with_backlog("tcp:9000:backlog=5"), "tcp:9000:backlog=5")
        self.assertEqual(with_backlog("unix:/tmp/s"), "unix:/tmp/s")


class DeliverCallbackTests(SynchronousTestCase):
    """
    L{deliver_callback} retries with exponential back-off, bounded in time.
    """

    def _deliver(self, answers, **kw):
        clock = Clock()
        times = []

        def post(url, body):
            times.append(clock.seconds())
            answer = answers.pop(0) if answers else 500
            if isinstance(answer, Exception):
                return fail(answer)
            if answer is None:
                return Deferred()
            return succeed(answer)

        d = Deferred.fromCoroutine(deliver_callback(clock, post, "http://x/", b"{}", **kw))
        for _ in range(200):
            clock.advance(1)
        return self.successResultOf(d), times

    def test_backoff(self) -> None:
        """
        Failures are retried after 1, 2, 4, ... seconds until a 2xx.
        """
        outcome, times = self._deliver([ConnectionError("refused"), 503, 500, 204])
        self.assertEqual(times, [0, 1, 3, 7])
        self.assertEqual(
            (outcome.status, outcome.attempts, outcome.http_status), ("delivered", 4, 204)
        )

    def test_gives_up(self) -> None:
        """
        Retries stop once the next one would pass C{give_up_after}; delays
        are capped at C{max_delay}.
        """
        outcome, times = self._deliver([], give_up_after=60, max_delay=16)
        self.assertEqual(times, [0, 1, 3, 7, 15, 31, 47])
        self.assertEqual((outcome.status, outcome.error), ("failed", "HTTP 500"))

    def test_timeout(self) -> None:
        """
        An attempt with no answer is cancelled after C{attempt_timeout}.
        """
        outcome, times = self._deliver([None, 200], attempt_timeout=5)
        self.assertEqual(times, [0, 6])
        self.assertEqual(outcome.status, "delivered")

    def test_permanent(self) -> None:
        """
        A 404 fails at once; a refused address is not retried.
        """
        outcome, times = self._deliver([404])
        self.assertEqual((outcome.status, times), ("failed", [0]))
        outcome, times = self._deliver([AddressRefused("no")])
        self.assertEqual((outcome.status, outcome.error, times), ("refused", "no", [0]))


class _HTTPTestCase(TestCase):
    def setUp(self) -> None:
        pool = HTTPConnectionPool(reactor)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)


class _FakeProcess:
    def __init__(self, proto):
        self.proto = proto
        self.pid = 4242
        self.signals = []
        self.lost = False

    def closeStdin(self):
        pass

    def signalProcess(self, name):
        self.signals.append(name)

    def loseConnection(self):
        self.lost = True


class _ProcessClock(Clock):
    """
    A L{Clock} that also records C{spawnProcess} calls (a fake
    L{IReactorProcess} for timer tests on fake time).
    """

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(
        self,
        proto,
        executable,
        args,
        env=None,
        path=None,
        uid=None,
        gid=None,
        usePTY=False,
        childFDs=None,
    ):
        process = _FakeProcess(proto)
        self.spawned.append((executable, args, uid, gid, childFDs, process))
        proto.makeConnection(process)
        return process


class TimerTests(SynchronousTestCase):
    """
    The runner's timers on fake time: job time, kill grace, drain, and its
    queue, with a L{MemoryJobStore} (which answers at once).
    """

    def _runner(self, store=None, **kw):
        clock = _ProcessClock()
        kw.setdefault("evict_delay", 0)
        runner = JobRunner(
            clock, store or MemoryJobStore(), post_callback=lambda u, b: succeed(200), **kw
        )
        self.successResultOf(Deferred.fromCoroutine(runner.start()))
        return clock, runner

    def _submit(self, runner, command, args):
        job = self.successResultOf(Deferred.fromCoroutine(runner.submit(command, args, None)))
        # A job that runs at once starts at the next turn (after its 202).
        runner._reactor.advance(0)
        return job

    def _get(self, runner, job_id):
        return self.successResultOf(Deferred.fromCoroutine(runner.get(job_id)))

    def test_jobtime_then_kill(self) -> None:
        """
        At C{job_time} the job gets SIGTERM, and SIGKILL C{kill_grace}
        later when it has not exited; the exit ends it as a timeout.
        """
        clock, runner = self._runner(job_time=10, kill_grace=3)
        job = self._submit(runner, "sleep", ["100"])
        executable, args, uid, gid, fds, process = clock.spawned[0]
        self.assertEqual((args, fds[0]), (["sleep", "100"], "w"))
        clock.advance(9.9)
        self.assertEqual(process.signals, [])
        clock.advance(0.1)
        self.assertEqual(process.signals, ["TERM"])
        clock.advance(2.9)
        self.assertEqual(process.signals, ["TERM"])
        clock.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        runner._running[job.id].ended(None, 9)
        done = self._get(runner, job.id)
        self.assertEqual((done.state, done.error, done.signal), ("finished", "timeout", "SIGKILL"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_started_after_answer(self) -> None:
        """
        A job that runs at once is started at the reactor's next turn, after
        its submission has returned (its 202 is out first); meanwhile it is
        running, and a stop then stops it as soon as it has started.
        """
        clock, runner = self._runner()
        job = self.successResultOf(Deferred.fromCoroutine(runner.submit("sleep", ["9"], None)))
        self.assertEqual(clock.spawned, [])
        self.assertEqual(runner.peek(job.id).state, "running")
        stopped = Deferred.fromCoroutine(runner.cancel(job.id))
        self.assertNoResult(stopped)
        clock.advance(0)
        process = clock.spawned[0][-1]
        self.assertEqual(process.signals, ["TERM"])
        runner._running[job.id].ended(None, 15)
        done = self.successResultOf(stopped)
        self.assertEqual((done.state, done.error, done.signal), ("finished", "stopped", "SIGTERM"))

    def test_accepted_and_started_one_event(self) -> None:
        """
        A job that starts as soon as it is accepted is logged once for both
        (with its command, arguments and pid); a job that waits for a slot
        is logged when accepted and again when started.
        """
        from twisted.logger import capturedLogs

        clock, runner = self._runner(max_running=1)
        with capturedLogs() as events:
            first = self._submit(runner, "true", ["1"])
            second = self._submit(runner, "true", ["2"])
            runner._running[first.id].ended(0, None)
        said = [
            (e["log_format"].split(":")[0].replace("{job_id}", e["job_id"]), e.get("pid"))
            for e in events
            if e.get("job_id") in (first.id, second.id) and "state" not in e
        ]
        pids = [s[-1].pid for s in clock.spawned]
        self.assertEqual(
            said,
            [
                (f"job {first.id} accepted and started", pids[0]),
                (f"job {second.id} accepted", None),
                (f"job {second.id} started", pids[1]),
            ],
        )
        started = next(e for e in events if "accepted and started" in e["log_format"])
        self.assertEqual((started["command"], list(started["arguments"])), ("true", ["1"]))

    def test_drain_after_exit(self) -> None:
        """
        When the process has exited but its pipes stay open, they are closed
        after C{drain_time}.
        """
        clock, runner = self._runner(drain_time=1)
        self._submit(runner, "sh", [])
        process = clock.spawned[0][-1]
        process.proto.processExited(None)
        clock.advance(0.9)
        self.assertFalse(process.lost)
        clock.advance(0.1)
        self.assertTrue(process.lost)

    def test_queue_order(self) -> None:
        """
        With C{max_running} 1 the second job starts only after the first
        ended.
        """
        clock, runner = self._runner(max_running=1)
        first = self._submit(runner, "true", ["1"])
        second = self._submit(runner, "true", ["2"])
        self.assertEqual(len(clock.spawned), 1)
        self.assertEqual(self._get(runner, second.id).state, "queued")
        runner._running[first.id].ended(0, None)
        self.assertEqual([s[1] for s in clock.spawned], [["true", "1"], ["true", "2"]])

    def test_other_user_without_fork(self) -> None:
        """
        A job run as another user is started through C{setpriv} (so that
        Twisted can use C{posix_spawn}, not a fork of this process), with
        that uid, gid and its groups, and the command found on C{PATH}.
        """
        from haikutx.jobs import process as process_module

        if process_module._SETPRIV is None:
            self.skipTest("setpriv is not installed")
        clock, runner = self._runner(uid=65534, gid=65533)
        self._submit(runner, "true", ["x"])
        executable, args, uid, gid, fds, _ = clock.spawned[0]
        self.assertEqual((executable, uid, gid), (process_module._SETPRIV, None, None))
        self.assertEqual(args[:3], ["setpriv", "--reuid=65534", "--regid=65533"])
        self.assertTrue(args[3].startswith("--groups=65533"), args[3])
        self.assertEqual(args[4], "--")
        self.assertTrue(args[5].endswith("/true"))
        self.assertEqual(args[6:], ["x"])

    def test_direct_start_and_delayed_eviction(self) -> None:
        """
        A job submitted while a slot is free and nothing waits is stored
        running, in the commit that accepts it; finished jobs beyond
        C{max_jobs} are evicted together, C{evict_delay} after a finish.
        """
        store = MemoryJobStore()
        clock, runner = self._runner(store=store, max_running=1, max_jobs=1, evict_delay=1)
        first = self._submit(runner, "true", [])
        self.assertEqual((first.state, first.owner), ("running", runner.owner))
        second = self._submit(runner, "true", [])
        self.assertEqual(second.state, "queued")
        runner._running[first.id].ended(0, None)
        runner._running[second.id].ended(0, None)
        third = self._submit(runner, "true", [])
        self.assertEqual(third.state, "running")
        runner._running[third.id].ended(0, None)
        self.assertEqual(len(store.jobs), 3)
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            clock.advance(1)
        self.assertEqual(list(store.jobs), [third.id])
        # One event for the jobs evicted together, naming them.
        evictions = [e for e in events if "evicted" in e["log_format"]]
        self.assertEqual(len(evictions), 1)
        self.assertEqual(evictions[0]["count"], 2)
        self.assertEqual(sorted(evictions[0]["job_ids"]), sorted([first.id, second.id]))

    def test_recent_jobs_without_store(self) -> None:
        """
        A job this runner finished is shown without asking its own store,
        until it is evicted; with a shared store, the store is asked.
        """

        class Counting(MemoryJobStore):
            gets = 0

            def get(self, job_id):
                Counting.gets += 1
                return super().get(job_id)

        store = Counting()
        clock, runner = self._runner(store=store, max_jobs=1)
        first = self._submit(runner, "true", [])
        runner._running[first.id].ended(0, None)
        self.assertEqual(self._get(runner, first.id).state, "finished")
        self.assertEqual(Counting.gets, 0)
        second = self._submit(runner, "true", [])
        runner._running[second.id].ended(0, None)
        self.assertIsNone(self._get(runner, first.id))
        shared = Counting()
        shared.shared = True
        clock, runner = self._runner(store=shared)
        third = self._submit(runner, "true", [])
        runner._running[third.id].ended(0, None)
        before = Counting.gets
        self.assertEqual(self._get(runner, third.id).state, "finished")
        self.assertEqual(Counting.gets, before + 1)

    def test_queued_jobs_without_store(self) -> None:
        """
        A job this runner queued is shown without asking its own store
        until it is claimed (then as running, from its process), and a
        queued job stopped by DELETE is no longer shown as queued.
        """

        class Counting(MemoryJobStore):
            gets = 0

            def get(self, job_id):
                Counting.gets += 1
                return super().get(job_id)

        store = Counting()
        clock, runner = self._runner(store=store, max_running=1)
        first = self._submit(runner, "true", ["1"])
        second = self._submit(runner, "true", ["2"])
        third = self._submit(runner, "true", ["3"])
        self.assertEqual(self._get(runner, second.id).state, "queued")
        self.assertEqual(Counting.gets, 0)
        stopped = self.successResultOf(Deferred.fromCoroutine(runner.cancel(third.id)))
        self.assertEqual((stopped.state, stopped.error), ("finished", "stopped"))
        self.assertNotIn(third.id, runner._queued)
        runner._running[first.id].ended(0, None)
        self.assertEqual(self._get(runner, second.id).state, "running")
        self.assertEqual(Counting.gets, 0)
        self.assertEqual(runner._queued, {})

    def test_snapshot_reused_until_output(self) -> None:
        """
        A running job's snapshot is the same value until output arrives or
        it is stopped.
        """
        clock, runner = self._runner()
        job = self._submit(runner, "sh", [])
        process = runner._running[job.id]
        first = runner.peek(job.id)
        self.assertIs(runner.peek(job.id), first)
        process._transport.proto.outReceived(b"out")
        after_output = runner.peek(job.id)
        self.assertIsNot(after_output, first)
        self.assertEqual(after_output.stdout, b"out")
        process.terminate("stopped")
        self.assertEqual(runner.peek(job.id).error, "stopped")

    def test_json_body_reused(self) -> None:
        """
        The API makes the JSON body of a job value once: the same value
        polled again gets the same bytes, a changed job a new body.
        """
        clock, runner = self._runner()
        resource = JobsResource(runner)
        job = self._submit(runner, "true", [])
        body = resource.body_of(job)
        self.assertEqual(json.loads(body)["id"], job.id)
        self.assertIs(resource.body_of(job), body)
        runner._running[job.id].ended(0, None)
        finished = runner.peek(job.id)
        self.assertEqual(json.loads(resource.body_of(finished))["state"], "finished")

    def test_metrics(self) -> None:
        """
        C{haiku_jobs_total} counts accepted jobs and each finished state.
        """
        from haikutx.metrics import JOBS

        def count(state):
            return JOBS.labels(state=state)._value.get()

        before = {s: count(s) for s in ("accepted", "finished", "failed", "deleted")}
        clock, runner = self._runner(max_running=1)
        ok = self._submit(runner, "true", [])
        bad = self._submit(runner, "false", [])
        queued = self._submit(runner, "true", [])
        self.successResultOf(Deferred.fromCoroutine(runner.cancel(queued.id)))
        runner._running[ok.id].ended(0, None)
        runner._running[bad.id].ended(1, None)
        after = {s: count(s) - before[s] for s in before}
        self.assertEqual(after, {"accepted": 3, "finished": 1, "failed": 1, "deleted": 1})


class _Receiver(Resource):
    isLeaf = True

    def __init__(self, statuses):
        super().__init__()
        self.statuses = statuses
        self.received = []

    def render_POST(self, request):
        self.received.append(
            (dict(request.requestHeaders.getAllRawHeaders()), request.content.read())
        )
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"ok"


class JobAPITests(_HTTPTestCase):
    """
    The job API with a real runner, real child processes and real sockets.
    """

    async def _server(self, store=None, token=None, **kw):
        kw.setdefault("kill_grace", 0.5)
        kw.setdefault("evict_delay", 0)
        runner = JobRunner(reactor, store or MemoryJobStore(), **kw)
        await runner.start()
        port = reactor.listenTCP(0, job_site(reactor, runner, token), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(runner.stop()))
        self.url = f"http://127.0.0.1:{port.getHost().port}/"
        return runner

    async def _post(self, body, headers=None):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = await self.http.post(self.url, data=body, headers=headers)
        return response.code, await response.json()

    async def _get(self, job_id, method="GET"):
        response = await self.http.request(method, self.url + job_id)
        return response.code, await response.json()

    async def _until_finished(self, job_id, timeout=10.0):
        for _ in range(int(timeout / 0.05)):
            code, job = await self._get(job_id)
            if job.get("state") == "finished":
                return job
            await deferLater(reactor, 0.05)
        self.fail(f"job {job_id} did not finish in {timeout}s")

    async def test_echo(self) -> None:
        """
        POST / answers 202 with the job; GET /<id> (also with a trailing
        slash) gives it finished, with output, code and times.
        """
        await self._server()
        code, job = await self._post({"command": "echo", "args": "foo  bar "})
        self.assertEqual(code, 202)
        self.assertRegex(job["id"], "^[0-9a-f]{40}$")
        self.assertEqual(job["arguments"], ["foo", "bar"])
        self.assertIsNone(job["code"])
        done = await self._until_finished(job["id"])
        self.assertEqual((done["stdout"], done["code"], done["error"]), ("foo bar\n", 0, None))
        self.assertTrue(done["finished"].endswith("Z"))
        code, again = await self._get(job["id"] + "/")
        self.assertEqual((code, again["stdout"]), (200, "foo bar\n"))

    async def test_list_args_no_shell(self) -> None:
        """
        A list of args is passed as is and nothing goes through a shell.
        """
        await self._server()
        _, job = await self._post({"command": "printf", "args": ["%s|", "a b", "$HOME;"]})
        done = await self._until_finished(job["id"])
        self.assertEqual(done["stdout"], "a b|$HOME;|")

    async def test_routes(self) -> None:
        """
        Unknown ids and paths that are not ids are 404; other methods and
        paths are 501.
        """
        await self._server()
        self.assertEqual(await self._get("0" * 40), (404, {"message": "Not Found"}))
        for path in ("abc", "A" * 40, "0" * 39, "0" * 41, "x/y"):
            self.assertEqual(await self._get(path), (404, {"message": "Not Found"}), path)
        self.assertEqual(await self._get("abc", "DELETE"), (404, {"message": "Not Found"}))
        for method, path in [("PUT", ""), ("GET", ""), ("HEAD", "0" * 40), ("PUT", "0" * 40)]:
            response = await self.http.request(method, self.url + path)
            self.assertEqual(response.code, 501, (method, path))
            if method != "HEAD":
                self.assertEqual(await response.json(), {"message": "Not Implemented"})
        response = await self.http.post(self.url + "x", data=b"{}")
        self.assertEqual(response.code, 501)

    async def test_bad_requests(self) -> None:
        """
        Invalid JSON, no command and a command outside the exact whitelist
        get 400 with the error text; a too large body gets 413.
        """
        await self._server(whitelist=["echo"])
        for body, error in [
            (b"{bad", "invalid JSON"),
            ({"args": "x"}, "command is missing"),
            ({"command": "/bin/echo"}, "Specified command is not in whitelist."),
            ({"command": "ech"}, "Specified command is not in whitelist."),
            ({"command": "echo", "callback": "http://127.0.0.1:1/"}, "loopback"),
            ({"command": "echo", "callback": "http://0x7f000001:1/"}, "loopback"),
            ({"command": "echo", "callback": "http://[::7f00:1]:1/"}, "loopback"),
            ({"command": "echo", "callback": "http://[64:ff9b::a9fe:a9fe]/"}, "metadata"),
            ({"command": "echo", "callback": "http://[2002:a00:1::]/"}, "private"),
            ({"command": "echo", "callback": "ftp://example.com/"}, "http"),
        ]:
            code, answer = await self._post(body)
            self.assertEqual((code, answer["message"]), (400, "Bad Request"))
            self.assertIn(error, answer["error"])
        code, answer = await self._post(b'{"command": "echo", "args": "' + b"x" * 70000 + b'"}')
        self.assertEqual(code, 413)
        code, _ = await self._post({"command": "echo"})
        self.assertEqual(code, 202)

    async def test_chunked_too_large(self) -> None:
        """
        A chunked body growing past the limit gets 413 too, and the server
        keeps answering.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        await self._server()

        class Raw(Protocol):
            def __init__(self):
                self.data = b""
                self.done = Deferred()

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                self.done.callback(self.data)

        raw = Raw()
        port = int(self.url.rsplit(":", 1)[1].rstrip("/"))
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
        chunk = b"x" * 32768
        raw.transport.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3
            + b"0\r\n\r\n"
        )
        answer = await raw.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 413"), answer[:100])
        self.assertEqual((await self._post({"command": "true"}))[0], 202)

    async def test_token(self) -> None:
        """
        With a token, requests without the right bearer token get 401.
        """
        await self._server(token="s3cret")
        self.assertEqual((await self._post({"command": "echo"}))[0], 401)
        self.assertEqual(
            (await self._post({"command": "echo"}, {"authorization": "Bearer nope"}))[0], 401
        )
        self.assertEqual(
            (await self._post({"command": "echo"}, {"authorization": "Bearer s3cret"}))[0], 202
        )

    async def test_stdin_closed_and_not_found(self) -> None:
        """
        A command reading stdin ends (stdin is closed); an unknown command
        finishes with an error.
        """
        await self._server()
        _, job = await self._post({"command": "cat", "args": "-"})
        self.assertEqual((await self._until_finished(job["id"]))["code"], 0)
        _, job = await self._post({"command": "no-such-command-xyz"})
        done = await self._until_finished(job["id"])
        self.assertIn("command not found", done["error"])

    async def test_output(self) -> None:
        """
        Output is visible while the job runs, capped to the most recent
        bytes with a truncation flag, and binary output is replaced.
        """
        await self._server(max_output=100)
        _, job = await self._post({"command": "sh", "args": ["-c", "echo first; exec sleep 30"]})
        for _ in range(200):
            _, seen = await self._get(job["id"])
            if seen["stdout"]:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual((seen["stdout"], seen["state"]), ("first\n", "running"))
        await self._get(job["id"], "DELETE")
        _, job = await self._post(
            {"command": "sh", "args": ["-c", "printf 'a%.0s' $(seq 150); printf 'tail\\377' >&2"]}
        )
        done = await self._until_finished(job["id"])
        self.assertEqual((len(done["stdout"]), done["stdout_truncated"]), (100, True))
        self.assertEqual((done["stderr"], done["stderr_truncated"]), ("tail\ufffd", False))

    async def test_delete_and_kill(self) -> None:
        """
        DELETE sends SIGTERM, then SIGKILL after the grace period to a job
        that ignores it, and answers the finished job; a grandchild holding
        the pipes does not keep it open.
        """
        await self._server(kill_grace=0.3)
        _, job = await self._post({"command": "sh", "args": ["-c", "trap '' TERM; sleep 2 & wait"]})
        await deferLater(reactor, 0.3)
        code, done = await self._get(job["id"], "DELETE")
        self.assertEqual(
            (code, done["state"], done["error"], done["signal"]),
            (200, "finished", "stopped", "SIGKILL"),
        )
        _, job = await self._post({"command": "sleep", "args": "30"})
        await deferLater(reactor, 0.1)
        _, done = await self._get(job["id"], "DELETE")
        self.assertEqual((done["signal"], done["error"]), ("SIGTERM", "stopped"))
        self.assertEqual(await self._get("f" * 40, "DELETE"), (404, {"message": "Not Found"}))

    async def test_jobtime(self) -> None:
        """
        A job running longer than C{job_time} is stopped as C{"timeout"}.
        """
        await self._server(job_time=0.3)
        _, job = await self._post({"command": "sleep", "args": "30"})
        done = await self._until_finished(job["id"])
        self.assertEqual((done["error"], done["signal"]), ("timeout", "SIGTERM"))

    async def test_maxrunning_queue(self) -> None:
        """
        Beyond C{max_running}, jobs wait and start in order.
        """
        await self._server(max_running=1)
        ids = []
        for n in range(3):
            code, job = await self._post({"command": "sh", "args": ["-c", f"sleep 0.2; echo {n}"]})
            ids.append(job["id"])
        self.assertEqual([job["state"]], ["queued"])
        done = [await self._until_finished(i) for i in ids]
        starts = [d["started"] for d in done]
        self.assertEqual(starts, sorted(starts))
        self.assertTrue(
            done[0]["finished"] <= done[1]["started"] and done[1]["finished"] <= done[2]["started"]
        )

    async def test_maxjobs(self) -> None:
        """
        C{max_jobs} evicts the oldest finished jobs, never a running one.
        """
        await self._server(max_jobs=2)
        _, running = await self._post({"command": "sleep", "args": "30"})
        ids = []
        for _ in range(3):
            _, job = await self._post({"command": "true"})
            await self._until_finished(job["id"])
            ids.append(job["id"])
        self.assertEqual((await self._get(ids[0]))[0], 404)
        self.assertEqual([(await self._get(i))[0] for i in ids[1:]], [200, 200])
        code, job = await self._get(running["id"])
        self.assertEqual((code, job["state"]), (200, "running"))
        await self._get(running["id"], "DELETE")

    async def test_callback(self) -> None:
        """
        A finished job is POSTed as JSON to its callback (a real receiver on
        loopback, allowed by prefix), retried after a failure, and the job
        records the outcome.
        """
        receiver = _Receiver([503])
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}/"
        await self._server(allow=[base])
        _, job = await self._post(
            {"command": "echo", "args": "héllo→", "callback": base + "cb?x=1"}
        )
        for _ in range(100):
            _, seen = await self._get(job["id"])
            if (seen["callback_outcome"] or {}).get("status") == "delivered":
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(
            seen["callback_outcome"],
            {"status": "delivered", "attempts": 2, "http_status": 200, "error": None},
        )
        headers, body = receiver.received[-1]
        sent = json.loads(body)
        self.assertEqual((sent["id"], sent["stdout"], sent["code"]), (job["id"], "héllo→\n", 0))
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])

    async def test_callback_refused(self) -> None:
        """
        A callback host name resolving to loopback is refused when sent and
        the job says so.
        """
        await self._server()
        for host in ("localhost",):
            _, job = await self._post({"command": "true", "callback": f"http://{host}:1/"})
            for _ in range(100):
                _, seen = await self._get(job["id"])
                if (seen["callback_outcome"] or {}).get("status") not in (None, "pending"):
                    break
                await deferLater(reactor, 0.05)
            self.assertEqual(seen["callback_outcome"]["status"], "refused", host)
            self.assertIn("loopback", seen["callback_outcome"]["error"])

    async def test_runs_as_user(self) -> None:
        """
        Started as root, commands run as the given user.
        """
        if os.geteuid() != 0:
            self.skipTest("needs root")
        uid, gid = command_user(None)
        await self._server(uid=uid, gid=gid)
        _, job = await self._post({"command": "id", "args": "-u"})
        done = await self._until_finished(job["id"])
        self.assertEqual(done["stdout"].strip(), str(uid))

    async def _as_nobody(self):
        if os.geteuid() != 0:
            self.skipTest("needs root")
        uid, gid = command_user(None)
        runner = await self._server(uid=uid, gid=gid)
        return runner, uid, gid

    async def _launcher_pid(self, runner):
        # The launcher has switched user once it answers.
        await runner._spawn.which("true", os.environ.get("PATH"))
        return runner._spawn._transport.pid

    async def test_launcher_is_the_user(self) -> None:
        """
        Jobs run as another user get a launcher that is that user for good
        (real, effective and saved ids, its groups) and not dumpable, and
        that starts each command itself (no C{setpriv} between): the job's
        parent is the launcher, its ids and groups are the user's own.
        """
        from haikutx.jobs.process import supplementary_groups

        runner, uid, gid = await self._as_nobody()
        launcher = await self._launcher_pid(runner)
        status = Path(f"/proc/{launcher}/status").read_text()
        lines = dict(line.split(":", 1) for line in status.splitlines())
        self.assertEqual(lines["Uid"].split(), [str(uid)] * 4)
        self.assertEqual(lines["Gid"].split(), [str(gid)] * 4)
        self.assertEqual(lines["CapEff"].strip(), "0" * 16)
        self.assertEqual(
            sorted(lines["Groups"].split()),
            sorted(supplementary_groups(uid, gid).split(",")),
        )
        script = (
            "echo $PPID; grep -E '^(Uid|Gid|Groups|CapPrm|CapEff):' /proc/$$/status;"
            " cat /proc/$PPID/cmdline | tr '\\0' ' '"
        )
        _, job = await self._post({"command": "sh", "args": ["-c", script]})
        done = await self._until_finished(job["id"])
        ppid, *rest = done["stdout"].splitlines()
        self.assertEqual(int(ppid), launcher)
        seen = dict(line.split(":", 1) for line in rest[:5])
        self.assertEqual(seen["Uid"].split(), [str(uid)] * 4)
        self.assertEqual(seen["Gid"].split(), [str(gid)] * 4)
        self.assertEqual(seen["CapPrm"].strip(), "0" * 16)
        self.assertEqual(seen["CapEff"].strip(), "0" * 16)
        self.assertIn("launcher.py", rest[5])
        self.assertNotIn("setpriv", done["stdout"])

    async def test_job_cannot_reach_launcher_pipes(self) -> None:
        """
        Hostile: a job (the launcher's user) cannot list or open the
        launcher's descriptors (its pipes to the runner) nor read its memory:
        the launcher is not dumpable.
        """
        runner, uid, gid = await self._as_nobody()
        launcher = await self._launcher_pid(runner)
        script = (
            "ls /proc/$PPID/fd && echo LISTED;"
            " cat /proc/$PPID/fd/0 < /dev/null && echo OPENED;"
            " head -c1 /proc/$PPID/mem && echo READ;"
            " cat /proc/$PPID/environ && echo ENVIRON; exit 0"
        )
        _, job = await self._post({"command": "sh", "args": ["-c", script]})
        done = await self._until_finished(job["id"])
        for word in ("LISTED", "OPENED", "READ", "ENVIRON"):
            self.assertNotIn(word, done["stdout"], done)
        self.assertIn("ermission denied", done["stderr"])
        self.assertEqual(runner._spawn._transport.pid, launcher)

    async def test_job_stops_launcher(self) -> None:
        """
        Hostile: a job that stops its launcher (SIGSTOP, which it may send:
        it is the same user) does not stop the runner: the launcher is
        continued and the next job runs.
        """
        runner, uid, gid = await self._as_nobody()
        _, job = await self._post({"command": "sh", "args": ["-c", "kill -STOP $PPID"]})
        await self._until_finished(job["id"])
        _, again = await self._post({"command": "echo", "args": "again"})
        self.assertEqual((await self._until_finished(again["id"]))["stdout"], "again\n")

    async def test_job_kills_launcher(self) -> None:
        """
        Hostile: a job that kills its launcher ends as failed (neither code
        nor signal), and the next job runs on a launcher started again, as
        the same user.
        """
        runner, uid, gid = await self._as_nobody()
        _, job = await self._post({"command": "sh", "args": ["-c", "kill -KILL $PPID; sleep 5"]})
        done = await self._until_finished(job["id"])
        self.assertEqual((done["code"], done["signal"]), (None, None))
        _, again = await self._post({"command": "id", "args": "-u"})
        self.assertEqual((await self._until_finished(again["id"]))["stdout"], f"{uid}\n")

    async def test_callback_ipv6_literal(self) -> None:
        """
        A callback to an IPv6 literal (C{http://[::1]:PORT/}) allowed by an
        C{--allow} prefix is delivered.
        """
        receiver = _Receiver([])
        try:
            port = reactor.listenTCP(0, Site(receiver), interface="::1")
        except Exception as e:
            self.skipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(port.stopListening)
        base = f"http://[::1]:{port.getHost().port}/"
        await self._server(allow=[base])
        code, job = await self._post({"command": "echo", "args": "six", "callback": base + "cb"})
        self.assertEqual(code, 202)
        for _ in range(100):
            _, seen = await self._get(job["id"])
            if (seen["callback_outcome"] or {}).get("status") not in (None, "pending"):
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(seen["callback_outcome"]["status"], "delivered", seen)
        self.assertEqual(json.loads(receiver.received[-1][1])["stdout"], "six\n")

    async def test_launched_clean(self) -> None:
        """
        A job started by the L{LauncherSpawner} inherits no descriptor but
        its stdin and two pipes (even one this process made inheritable) and
        no ignored signal, and its output and exit code come through.
        """
        from haikutx.jobs.spawn import LauncherSpawner

        leaked_r, leaked_w = os.pipe()
        os.set_inheritable(leaked_w, True)
        self.addCleanup(os.close, leaked_r)
        self.addCleanup(os.close, leaked_w)
        import signal as signal_module

        previous = signal_module.signal(signal_module.SIGUSR1, signal_module.SIG_IGN)
        self.addCleanup(signal_module.signal, signal_module.SIGUSR1, previous)
        runner = await self._server()
        self.assertIsInstance(runner._spawn, LauncherSpawner)
        script = (
            "ls /proc/$$/fd | sort -n | tr '\\n' ' '; echo; grep SigIgn /proc/$$/status;"
            " grep policy /proc/$$/sched; exit 3"
        )
        _, job = await self._post({"command": "sh", "args": ["-c", script]})
        done = await self._until_finished(job["id"])
        fds, ignored, policy = done["stdout"].split("\n", 2)
        self.assertEqual(fds.split()[:3], ["0", "1", "2"])
        # The usual scheduling (the launcher's own is SCHED_BATCH).
        self.assertEqual(policy.split()[-1], str(os.SCHED_OTHER), policy)
        self.assertNotIn(str(leaked_w), fds.split()[3:], done["stdout"])
        self.assertEqual(int(ignored.split()[1], 16) & (1 << (signal_module.SIGUSR1 - 1)), 0)
        self.assertEqual(done["code"], 3)

    async def test_form_content_type(self) -> None:
        """
        The body is read as JSON whatever its declared content type: one sent
        as C{multipart/form-data} is not parsed as a form.
        """
        await self._server()
        code, job = await self._post(
            {"command": "echo", "args": "form"},
            headers={"Content-Type": ["multipart/form-data; boundary=x"]},
        )
        self.assertEqual(code, 202, job)
        self.assertEqual((await self._until_finished(job["id"]))["stdout"], "form\n")

    async def test_launcher_dies(self) -> None:
        """
        When the launcher dies, the jobs it ran end (failed, neither code
        nor signal) and the next job runs on a launcher started again.
        """
        runner = await self._server()
        _, job = await self._post({"command": "sh", "args": ["-c", "echo $$; exec sleep 30"]})
        for _ in range(200):
            _, seen = await self._get(job["id"])
            if seen["stdout"]:
                break
            await deferLater(reactor, 0.05)
        self.addCleanup(_kill_quietly, int(seen["stdout"]))
        os.kill(runner._spawn._transport.pid, signal.SIGKILL)
        done = await self._until_finished(job["id"])
        self.assertEqual((done["code"], done["signal"]), (None, None))
        _, again = await self._post({"command": "echo", "args": "again"})
        self.assertEqual((await self._until_finished(again["id"]))["stdout"], "again\n")

    async def test_many_at_once(self) -> None:
        """
        Submissions arriving together share commits: 50 concurrent POSTs
        are all accepted and stored with fewer commits than jobs.
        """
        from haikutx.jobs.store.sqlite import SQLiteJobStore

        store = SQLiteJobStore(reactor, Path(self.mktemp()) / "jobs.sqlite3")
        await self._server(store=store, whitelist=["true"], max_running=1)
        before = store.commits
        from twisted.internet.defer import gatherResults

        answers = await gatherResults(
            [Deferred.fromCoroutine(self._post({"command": "true"})) for _ in range(50)]
        )
        self.assertEqual({code for code, _ in answers}, {202})
        self.assertLess(store.commits - before, 50)


class TakenOverTests(TestCase):
    """
    A runner whose job another runner took over (its lease ran out) leaves
    that job alone when it finishes.
    """

    async def test_no_double_callback(self) -> None:
        """
        The job ends after another runner marked it interrupted: this runner
        saves nothing over it and sends no callback (the other one does).
        """
        from attrs import evolve

        store = MemoryJobStore()
        sent = []

        def post(url, body):
            sent.append(json.loads(body)["id"])
            return succeed(200)

        runner = JobRunner(reactor, store, post_callback=post, evict_delay=0)
        await runner.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(runner.stop()))
        job = await runner.submit("sh", ["-c", "sleep 0.3"], "http://example.com/cb")
        for _ in range(100):
            if store.jobs[job.id].state == "running":
                break
            await deferLater(reactor, 0.01)
        taken = evolve(store.jobs[job.id], owner="other", state="finished", error="interrupted")
        store.jobs[job.id] = taken
        for _ in range(200):
            if job.id not in runner._running and not runner._known.saving:
                break
            await deferLater(reactor, 0.02)
        await deferLater(reactor, 0.1)
        self.assertEqual(store.jobs[job.id], taken)
        self.assertEqual(sent, [])


class RunnerStartTests(TestCase):
    """
    L{JobRunner.start} and L{JobService} on a store with earlier jobs.
    """

    async def test_pending_callback_and_running(self) -> None:
        """
        A job stored as running (by the previous process) comes back
        interrupted and its callback is sent; a finished job whose callback
        was still pending gets it sent again; both changes are saved.
        """
        store = MemoryJobStore()
        running = Job(
            id="a" * 40,
            seq=4,
            command="echo",
            arguments=(),
            state="running",
            callback="http://example.com/",
            owner="before",
        )
        pending = Job(
            id="b" * 40,
            seq=3,
            command="echo",
            arguments=(),
            state="finished",
            callback="http://example.com/",
            callback_outcome=CallbackOutcome("pending", 2),
            owner="before",
        )
        store.jobs = {running.id: running, pending.id: pending}
        sent = []

        def post(url, body):
            sent.append(json.loads(body)["id"])
            return succeed(200)

        runner = JobRunner(reactor, store, post_callback=post)
        await runner.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(runner.stop()))
        back = store.jobs[running.id]
        self.assertEqual(
            (back.state, back.error, back.owner), ("finished", "interrupted", runner.owner)
        )
        self.assertEqual(sorted(sent), sorted([pending.id, running.id]))
        self.assertEqual(back.callback_outcome.status, "delivered")
        self.assertEqual(store.jobs[pending.id].callback_outcome.status, "delivered")
        self.assertEqual((await runner.submit("echo", [], None)).seq, 5)

    async def test_warns_without_whitelist(self) -> None:
        """
        The service logs a warning at start when no whitelist is set, and
        job events carry C{job_id}.
        """
        from twisted.logger import LogLevel, capturedLogs

        runner = JobRunner(reactor, MemoryJobStore(), post_callback=lambda u, b: succeed(200))
        service = JobService(runner)
        with capturedLogs() as events:
            service.startService()
            await runner.wait_ready()
            job = await runner.submit("true", [], None)
            # "accepted and started" is logged once the job has started.
            for _ in range(200):
                if any(e.get("job_id") == job.id for e in events):
                    break
                await deferLater(reactor, 0.05)
        self.addCleanup(service.stopService)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertTrue(any("whitelist" in e["log_format"] for e in warnings))
        self.assertTrue(any(e.get("job_id") == job.id for e in events))

    async def test_started_event_names_the_pid(self) -> None:
        """
        The C{job started} event names the job's pid, even for a command
        that is over (and reaped) before its start is logged.
        """
        from twisted.logger import capturedLogs

        runner = JobRunner(reactor, MemoryJobStore(), post_callback=lambda u, b: succeed(200))
        service = JobService(runner)
        with capturedLogs() as events:
            service.startService()
            self.addCleanup(service.stopService)
            await runner.wait_ready()
            job = await runner.submit("true", [], None)
            for _ in range(100):
                started = [
                    e for e in events
                    if e.get("job_id") == job.id and "started" in e["log_format"]
                ]
                if started:
                    break
                await deferLater(reactor, 0.05)
        self.assertEqual(len(started), 1)
        self.assertIsInstance(started[0]["pid"], int)
        self.assertGreater(started[0]["pid"], 0)


def start_twistd(case, port, state, *extra):
    """
    Start C{twistd -n haiku --jobs} on C{127.0.0.1:port} with the state
    directory C{state} and C{extra} options; killed when C{case} ends.
    """
    env = dict(os.environ, PYTHONPATH=str(_ROOT))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "haiku",
            "--jobs",
            f"tcp:{port}:interface=127.0.0.1",
            "--port",
            "none",
            "--sslport",
            "none",
            "--state",
            str(state),
            *extra,
        ],
        cwd=str(state.parent),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    case.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
    return process


class _TwistdTestCase(_HTTPTestCase):
    """
    Helpers for tests of real C{twistd -n haiku --jobs} processes.
    """

    timeout = 90

    def _free_port(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def _start(self, port, state, *extra):
        return start_twistd(self, port, state, *extra)

    async def _wait_up(self, url):
        for _ in range(300):
            try:
                response = await self.http.get(url + "0" * 40)
                await response.content()
                if response.code == 404:
                    return
            except Exception:
                pass
            await deferLater(reactor, 0.05)
        self.fail("twistd did not start within 15 s")

    async def _job(self, url, job_id):
        response = await self.http.get(url + job_id)
        return await response.json()


class TwistdRestartTests(_TwistdTestCase):
    """
    C{twistd -n haiku --jobs} killed with SIGKILL loses no job.
    """

    async def test_sigkill_restart(self) -> None:
        """
        After SIGKILL and a restart on the same state directory, finished
        jobs keep their output and running ones come back interrupted.
        """
        state = Path(self.mktemp()).absolute() / "state"
        state.parent.mkdir()
        port = self._free_port()
        url = f"http://127.0.0.1:{port}/"
        first = self._start(port, state)
        await self._wait_up(url)
        response = await self.http.post(url, data=b'{"command": "echo", "args": "survives"}')
        done = await response.json()
        response = await self.http.post(
            url, data=b'{"command": "sh", "args": ["-c", "echo $$; exec sleep 30"]}'
        )
        running = await response.json()
        for _ in range(100):
            if (await self._job(url, done["id"]))["state"] == "finished":
                break
            await deferLater(reactor, 0.05)
        for _ in range(100):
            pid = (await self._job(url, running["id"]))["stdout"].strip()
            if pid:
                break
            await deferLater(reactor, 0.05)
        self.addCleanup(_kill_quietly, int(pid))
        await deferLater(reactor, 0.7)  # more than one output flush interval
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The job dies with the server (its launcher kills it). Bounded at
        # 15 s, half the job's own 30 s: a job left running would still
        # be seen alive.
        for _ in range(300):
            if not _alive(int(pid)):
                break
            await deferLater(reactor, 0.05)
        self.assertFalse(
            _alive(int(pid)), f"a job outlived its SIGKILLed server: {_where(int(pid))}"
        )
        second = self._start(port, state)
        await self._wait_up(url)
        kept = await self._job(url, done["id"])
        self.assertEqual((kept["stdout"], kept["code"]), ("survives\n", 0))
        back = await self._job(url, running["id"])
        self.assertEqual((back["state"], back["error"]), ("finished", "interrupted"))
        second.send_signal(signal.SIGTERM)
        for _ in range(200):
            if second.poll() is not None:
                break
            await deferLater(reactor, 0.05)
        # twistd ends itself with the signal it stopped on.
        self.assertIn(second.poll(), (0, -signal.SIGTERM))


def _listen_backlog(port: int) -> int:
    """
    The backlog of the socket listening on C{127.0.0.1:port}, as the kernel
    reports it (C{ss}: the Send-Q of a listening socket).
    """
    if shutil.which("ss") is None:
        raise SkipTest("ss (iproute2) is not installed")
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout
    return int(out.split()[2])


class TwistdLoadTests(_TwistdTestCase):
    """
    C{twistd -n haiku --jobs} under many submissions at once.
    """

    async def test_sigkill_right_after_202(self) -> None:
        """
        Every job answered 202 is in the database: SIGKILL the server the
        moment the last of 30 concurrent submissions is answered, restart
        it, and each job is there.
        """
        state = Path(self.mktemp()).absolute() / "state"
        state.parent.mkdir()
        port = self._free_port()
        url = f"http://127.0.0.1:{port}/"
        first = self._start(port, state, "--maxrunning", "1", "--whitelist", "sleep")
        await self._wait_up(url)
        ids = []
        count = 30

        async def submit():
            response = await self.http.post(url, data=b'{"command": "sleep", "args": "0.2"}')
            job = await response.json()
            self.assertEqual(response.code, 202)
            ids.append(job["id"])
            if len(ids) == count:
                first.send_signal(signal.SIGKILL)

        from twisted.internet.defer import gatherResults

        await gatherResults([Deferred.fromCoroutine(submit()) for _ in range(count)])
        first.wait(10)
        self._start(port, state, "--maxrunning", "1", "--whitelist", "sleep")
        await self._wait_up(url)
        for job_id in ids:
            response = await self.http.get(url + job_id)
            self.assertEqual(response.code, 200, job_id)
            await response.content()

    async def test_300_concurrent_submits(self) -> None:
        """
        300 clients connecting and submitting at the same moment all get
        202: none is reset because the listen queue was full.
        """
        from twisted.internet.defer import gatherResults
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        state = Path(self.mktemp()).absolute() / "state"
        state.parent.mkdir()
        port = self._free_port()
        url = f"http://127.0.0.1:{port}/"
        server = self._start(port, state, "--maxrunning", "1", "--whitelist", "true")
        await self._wait_up(url)
        self.assertGreaterEqual(_listen_backlog(port), 300)
        body = b'{"command": "true"}'
        request = (
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

        class Once(Protocol):
            def __init__(self):
                self.data = b""
                self.done = Deferred()

            def connectionMade(self):
                self.transport.write(request)

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                self.done.callback((self.data, reason.value))

        async def one():
            protocol = Once()
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30), protocol
            )
            data, reason = await protocol.done
            return data.split(b"\r\n", 1)[0], type(reason).__name__

        # The server stops accepting for a moment: the 300 connections wait
        # in its listen queue.
        server.send_signal(signal.SIGSTOP)
        clients = gatherResults([Deferred.fromCoroutine(one()) for _ in range(300)])
        await deferLater(reactor, 0.5)
        server.send_signal(signal.SIGCONT)
        results = await clients
        statuses = [line for line, _ in results]
        self.assertEqual(statuses.count(b"HTTP/1.1 202 Accepted"), 300, set(results))


class BuildServiceTests(SynchronousTestCase):
    """
    L{build_service} adds the C{jobs} service when C{--jobs} is set.
    """

    def test_named(self) -> None:
        """
        The job runner is the child named C{jobs}; absent without C{--jobs}.
        """
        config = Config(jobs="tcp:0:interface=127.0.0.1", state=Path(self.mktemp()))
        top = build_service(reactor, config)
        self.assertEqual(top.getServiceNamed("jobs").name, "jobs")
        self.assertRaises(KeyError, build_service(reactor, Config()).getServiceNamed, "jobs")


class JobStoreOptionTests(SynchronousTestCase):
    """
    C{--jobstore} picks the store: a PostgreSQL URL, or SQLite by default.
    """

    def _config(self, *argv: str) -> Config:
        from haikutx.tap import Options

        options = Options()
        options.parseOptions(["--jobs", "9000", *argv])
        return options.config

    def test_default_sqlite(self) -> None:
        """
        Without C{--jobstore}, jobs are kept in SQLite in the state directory.
        """
        from haikutx.jobs.service import job_store
        from haikutx.jobs.store.sqlite import SQLiteJobStore

        config = self._config("--state", self.mktemp())
        self.assertIsNone(config.jobstore)
        store = job_store(reactor, config)
        self.assertIsInstance(store, SQLiteJobStore)
        self.assertEqual(store._path, config.state / "jobs.sqlite3")

    def test_postgresql(self) -> None:
        """
        A PostgreSQL URL gives a shared L{PostgreSQLJobStore}; anything else
        stops start-up naming the option.
        """
        from twisted.python.usage import UsageError

        from haikutx.jobs.service import job_store
        from haikutx.jobs.store.postgresql import PostgreSQLJobStore

        url = "postgresql://jobs@db.example/haikutx"
        config = self._config("--jobstore", url)
        store = job_store(reactor, config)
        self.assertIsInstance(store, PostgreSQLJobStore)
        self.assertTrue(store.shared)
        e = self.assertRaises(UsageError, self._config, "--jobstore", "mysql://x/y")
        self.assertIn("--jobstore", str(e))


class SharedQueueTests(_TwistdTestCase):
    """
    Two and three real C{twistd -n haiku --jobs} runners on one PostgreSQL
    database (a server of the test's own) serve one queue.
    """

    timeout = 120

    async def _runners(self, count, *extra, url=None):
        """
        Start C{count} runners on one fresh database; return their base
        URLs, their processes and the database URL.
        """
        from haikutx.test import postgres

        database = url or postgres.database(self)
        urls, processes = [], []
        for n in range(count):
            state = Path(self.mktemp()).absolute() / f"state{n}"
            state.parent.mkdir(parents=True, exist_ok=True)
            port = self._free_port()
            processes.append(
                self._start(port, state, "--jobstore", database, "--user", "root", *extra)
            )
            urls.append(f"http://127.0.0.1:{port}/")
        for base in urls:
            await self._wait_up(base)
        return urls, processes, database

    async def _post(self, base, body):
        response = await self.http.post(base, data=json.dumps(body).encode())
        job = await response.json()
        self.assertEqual(response.code, 202, job)
        return job

    async def _until(self, base, job_id, predicate, seconds=30.0):
        for _ in range(int(seconds / 0.1)):
            job = await self._job(base, job_id)
            if predicate(job):
                return job
            await deferLater(reactor, 0.1)
        self.fail(f"job {job_id} not as expected within {seconds}s: {job}")

    async def test_each_job_runs_once(self) -> None:
        """
        Jobs posted to any of three runners each run exactly once, and each
        runner's GET shows every job.
        """
        urls, _, _ = await self._runners(3, "--maxrunning", "2")
        marks = Path(self.mktemp()).absolute()
        marks.mkdir()
        ids = []
        for n in range(30):
            job = await self._post(
                urls[n % 3],
                {"command": "sh", "args": ["-c", f"echo {n} >> {marks}/runs; echo $PPID"]},
            )
            ids.append(job["id"])
        pids = set()
        for n, job_id in enumerate(ids):
            done = await self._until(urls[(n + 1) % 3], job_id, lambda j: j["state"] == "finished")
            self.assertEqual(done["code"], 0, done)
            pids.add(done["stdout"].strip())
        runs = sorted(int(line) for line in (marks / "runs").read_text().split())
        self.assertEqual(runs, list(range(30)))
        self.assertGreater(len(pids), 1, "every job ran on the same runner")

    async def test_free_slot_anywhere_and_delete_from_another(self) -> None:
        """
        With one slot each, two jobs posted to one runner run at once (the
        second on the other runner); a DELETE sent to the runner that does
        not run a job stops it.
        """
        urls, processes, _ = await self._runners(2, "--maxrunning", "1")
        script = "echo $PPID; exec sleep 30"
        first = await self._post(urls[0], {"command": "sh", "args": ["-c", script]})
        second = await self._post(urls[0], {"command": "sh", "args": ["-c", script]})
        running = [
            await self._until(urls[1], j["id"], lambda j: j["state"] == "running" and j["stdout"])
            for j in (first, second)
        ]
        parents = {_runner_of(int(j["stdout"])) for j in running}
        self.assertEqual(parents, {p.pid for p in processes})
        for job in running:
            other = urls[1] if _runner_of(int(job["stdout"])) == processes[0].pid else urls[0]
            response = await self.http.request("DELETE", other + job["id"])
            stopped = await response.json()
            self.assertEqual(response.code, 200)
            self.assertEqual(
                (stopped["state"], stopped["error"], stopped["signal"]),
                ("finished", "stopped", "SIGTERM"),
            )

    async def test_sigkill_runner(self) -> None:
        """
        A runner killed with SIGKILL holds nothing: within 30 s another
        runner marks its running job interrupted and delivers its callback,
        and the job queued behind it runs on the other runner.
        """
        receiver = _Receiver([])
        listening = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        hook = f"http://127.0.0.1:{listening.getHost().port}/"
        urls, processes, _ = await self._runners(2, "--maxrunning", "1", "--allow", hook)
        script = "echo $PPID $$; exec sleep 60"
        first = await self._post(
            urls[0], {"command": "sh", "args": ["-c", script], "callback": hook + "cb"}
        )
        second = await self._post(urls[0], {"command": "sh", "args": ["-c", script]})
        seen = {}
        for job in (first, second):
            seen[job["id"]] = await self._until(
                urls[1], job["id"], lambda j: j["state"] == "running" and j["stdout"]
            )
        for job in seen.values():
            pid = int(job["stdout"].split()[1])
            self.addCleanup(lambda pid=pid: _kill_quietly(pid))
        queued = await self._post(urls[0], {"command": "echo", "args": "after"})
        victim_pid = _runner_of(int(seen[first["id"]]["stdout"].split()[0]))
        victim = next(p for p in processes if p.pid == victim_pid)
        orphan = int(seen[first["id"]]["stdout"].split()[1])
        survivor = urls[1] if victim is processes[0] else urls[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = reactor.seconds()
        interrupted = await self._until(
            survivor, first["id"], lambda j: j["state"] == "finished", seconds=30
        )
        self.assertLess(reactor.seconds() - killed_at, 30)
        self.assertEqual(interrupted["error"], "interrupted")
        # Its job died with it (its launcher killed it).
        self.assertFalse(_alive(orphan), f"the killed runner's job {orphan} still runs")
        delivered = await self._until(
            survivor,
            first["id"],
            lambda j: (j["callback_outcome"] or {}).get("status") == "delivered",
            seconds=10,
        )
        self.assertEqual(json.loads(receiver.received[-1][1])["id"], first["id"])
        self.assertEqual(delivered["error"], "interrupted")
        # The survivor's one slot is busy with the other job: stop it, and
        # the queued job runs there.
        response = await self.http.request("DELETE", survivor + second["id"])
        await response.content()
        after = await self._until(survivor, queued["id"], lambda j: j["state"] == "finished")
        self.assertEqual(after["stdout"], "after\n")


def _runner_of(launched: int) -> int:
    """
    The runner whose launcher is the parent process C{launched}.
    """
    fields = Path(f"/proc/{launched}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


def _alive(pid: int) -> bool:
    """
    Whether C{pid} is a process that has not exited (a zombie has).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def _where(pid: int) -> str:
    """
    What a failure message says of a process: its state and its parent's
    command line, if it is still there.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        parent = Path(f"/proc/{fields[1]}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, IndexError):
        return "gone"
    return f"state {fields[0]}, parent {fields[1]} {parent[:120]!r}"


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class JobSiteLogTests(SynchronousTestCase):
    """
    L{JobSite} leaves accepted jobs and job lookups out of the access log.
    """

    def test_quiet(self) -> None:
        """
        POST answered 202 and GET answered 200 get no access-log line; a
        refused POST, a 404 and a DELETE do.
        """
        from twisted.web.server import Site as BaseSite

        from haikutx.jobs.api import JobSite

        logged = []
        self.patch(BaseSite, "log", lambda site, request: logged.append(request))
        site = JobSite(Resource())

        class Request:
            def __init__(self, method, code):
                self.method, self.code = method, code

        for method, code in [
            (b"POST", 202),
            (b"GET", 200),
            (b"POST", 400),
            (b"GET", 404),
            (b"DELETE", 200),
        ]:
            site.log(Request(method, code))
        self.assertEqual(
            [(r.method, r.code) for r in logged],
            [(b"POST", 400), (b"GET", 404), (b"DELETE", 200)],
        )


class ShutdownTests(SynchronousTestCase):
    """
    A runner that was never stopped does not keep its process alive.
    """

    def test_exits(self) -> None:
        """
        A program that started a L{JobRunner} on SQLite (with its store and
        spawn threads) and stops the reactor without stopping the runner
        exits.
        """
        script = f"""
import sys
sys.path.insert(0, {str(_ROOT)!r})
from pathlib import Path
from twisted.internet import reactor, defer
from haikutx.jobs.runner import JobRunner
from haikutx.jobs.store.sqlite import SQLiteJobStore
runner = JobRunner(reactor, SQLiteJobStore(reactor, Path({self.mktemp()!r}) / "j.sqlite3"))
reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(runner.start()))
reactor.callLater(1, reactor.stop)
reactor.run()
print("done")
"""
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
        self.assertEqual(result.stdout.strip(), "done", result.stderr)
