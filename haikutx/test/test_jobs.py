# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Tests for L{haikutx.jobs.runner}: pure parts on Clock, the API and the runner on
real processes and sockets, and a real restart of C{twistd haiku}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from haikutx.config import Config
from haikutx.jobs.runner import (
    AddressRefused,
    JobRefused,
    JobRunner,
    OutputBuffer,
    check_callback_url,
    command_user,
    deliver_callback,
    job_site,
    parse_job_request,
    refused_callback_address,
    split_args,
)
from haikutx.jobs.store.sqlite import SQLiteJobStore
from haikutx.service import build_service
from haikutx.testing import MemoryJobStore

_ROOT = Path(__file__).resolve().parents[2]


class SplitArgsTests(SynchronousTestCase):
    """
    L{split_args} turns C{args} into an argument list.
    """

    @given(st.lists(st.text(alphabet="abc-./", min_size=1), max_size=5), st.text(" \t\n", min_size=1))
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


class AddressRulesTests(SynchronousTestCase):
    """
    L{refused_callback_address} and L{check_callback_url} apply the address
    rules to callbacks.
    """

    @given(st.integers(0x7F000000, 0x7FFFFFFF))
    def test_loopback_v4(self, n) -> None:
        """
        Every 127/8 address is refused as loopback, also IPv4-mapped.
        """
        address = ipaddress.IPv4Address(n)
        self.assertEqual(refused_callback_address(address), "loopback")
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        self.assertEqual(refused_callback_address(mapped), "loopback")

    def test_reasons(self) -> None:
        """
        Private, link-local, metadata and unspecified addresses are refused;
        a global one is allowed.
        """
        cases = {
            "::1": "loopback",
            "10.1.2.3": "private",
            "192.168.0.1": "private",
            "fd12::1": "private",
            "169.254.1.1": "link-local",
            "169.254.169.254": "metadata",
            "0.0.0.0": "unspecified",
            "100.64.0.1": "reserved",
            "93.184.216.34": None,
        }
        for text, reason in cases.items():
            self.assertEqual(refused_callback_address(ipaddress.ip_address(text)), reason, text)

    def test_urls(self) -> None:
        """
        Loopback literals are refused unless an C{--allow} prefix covers
        them; non-http URLs are refused; host names pass (checked on send).
        """
        for url in ("http://127.0.0.2/cb", "http://[::1]:8/", "http://[::ffff:127.0.0.1]/"):
            self.assertRaises(JobRefused, check_callback_url, url, ())
        self.assertEqual(
            check_callback_url("http://127.0.0.2/cb", ("http://127.0.0.2/",)),
            "http://127.0.0.2/cb",
        )
        self.assertRaises(JobRefused, check_callback_url, "ftp://example.com/", ())
        self.assertRaises(JobRefused, check_callback_url, "http://h:99999/", ())
        self.assertEqual(check_callback_url("http://localhost/", ()), "http://localhost/")


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

        d = Deferred.fromCoroutine(
            deliver_callback(clock, post, "http://x/", b"{}", **kw)
        )
        for _ in range(200):
            clock.advance(1)
        return self.successResultOf(d), times

    def test_backoff(self) -> None:
        """
        Failures are retried after 1, 2, 4, ... seconds until a 2xx.
        """
        outcome, times = self._deliver([ConnectionError("refused"), 503, 500, 204])
        self.assertEqual(times, [0, 1, 3, 7])
        self.assertEqual((outcome.status, outcome.attempts, outcome.http_status), ("delivered", 4, 204))

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

    def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None, usePTY=False, childFDs=None):
        process = _FakeProcess(proto)
        self.spawned.append((executable, args, uid, gid, childFDs, process))
        proto.makeConnection(process)
        return process


class TimerTests(SynchronousTestCase):
    """
    The runner's timers on fake time: job time, kill grace, drain.
    """

    def _runner(self, **kw):
        clock = _ProcessClock()
        runner = JobRunner(clock, MemoryJobStore(), post_callback=lambda u, b: succeed(200), **kw)
        self.successResultOf(Deferred.fromCoroutine(runner.start()))
        return clock, runner

    def test_jobtime_then_kill(self) -> None:
        """
        At C{job_time} the job gets SIGTERM, and SIGKILL C{kill_grace}
        later when it has not exited; the exit ends it as a timeout.
        """
        clock, runner = self._runner(job_time=10, kill_grace=3)
        job = runner.submit("sleep", ["100"], None)
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
        runner._ended(runner._jobs[job.id], None, 9)
        done = runner.get(job.id)
        self.assertEqual((done.state, done.error, done.signal), ("finished", "timeout", "SIGKILL"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_drain_after_exit(self) -> None:
        """
        When the process has exited but its pipes stay open, they are closed
        after C{drain_time}.
        """
        clock, runner = self._runner(drain_time=1)
        runner.submit("sh", [], None)
        process = clock.spawned[0][-1]
        process.proto.processExited(None)
        clock.advance(0.9)
        self.assertFalse(process.lost)
        clock.advance(0.1)
        self.assertTrue(process.lost)

    def test_queue_order(self) -> None:
        """
        With C{max_running} 1 the second job starts only after the first
        ended, and runs as the given uid and gid.
        """
        clock, runner = self._runner(max_running=1, uid=65534, gid=65534)
        first = runner.submit("true", ["1"], None)
        second = runner.submit("true", ["2"], None)
        self.assertEqual(len(clock.spawned), 1)
        self.assertEqual(runner.get(second.id).state, "queued")
        runner._ended(runner._jobs[first.id], 0, None)
        self.assertEqual([s[1] for s in clock.spawned], [["true", "1"], ["true", "2"]])
        self.assertEqual(clock.spawned[1][2:4], (65534, 65534))


class _Receiver(Resource):
    isLeaf = True

    def __init__(self, statuses):
        super().__init__()
        self.statuses = statuses
        self.received = []

    def render_POST(self, request):
        self.received.append((dict(request.requestHeaders.getAllRawHeaders()), request.content.read()))
        request.setResponseCode(self.statuses.pop(0) if self.statuses else 200)
        return b"ok"


class JobAPITests(_HTTPTestCase):
    """
    The job API with a real runner, real child processes and real sockets.
    """

    async def _server(self, store=None, token=None, **kw):
        kw.setdefault("kill_grace", 0.5)
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
        Unknown ids are 404; other methods and paths are 501.
        """
        await self._server()
        self.assertEqual(await self._get("0" * 40), (404, {"message": "Not Found"}))
        for method, path in [("PUT", ""), ("GET", ""), ("GET", "A" * 40), ("GET", "0" * 39), ("HEAD", "0" * 40)]:
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
            ({"command": "echo", "callback": "http://127.0.0.1:1/"}, "not allowed (loopback)"),
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
        self.assertEqual((await self._post({"command": "echo"}, {"authorization": "Bearer nope"}))[0], 401)
        self.assertEqual((await self._post({"command": "echo"}, {"authorization": "Bearer s3cret"}))[0], 202)

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
        _, job = await self._post({"command": "sh", "args": ["-c", "printf 'a%.0s' $(seq 150); printf 'tail\\377' >&2"]})
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
        self.assertEqual((code, done["state"], done["error"], done["signal"]), (200, "finished", "stopped", "SIGKILL"))
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
        self.assertTrue(done[0]["finished"] <= done[1]["started"] and done[1]["finished"] <= done[2]["started"])

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
        _, job = await self._post({"command": "echo", "args": "héllo→", "callback": base + "cb?x=1"})
        for _ in range(100):
            _, seen = await self._get(job["id"])
            if (seen["callback_outcome"] or {}).get("status") == "delivered":
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(seen["callback_outcome"], {"status": "delivered", "attempts": 2, "http_status": 200, "error": None})
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
        for host in ("localhost", "0x7f000001"):
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

    async def test_restart_in_process(self) -> None:
        """
        A runner on the same database finds finished jobs with their output,
        running ones interrupted, and queued ones queued again.
        """
        path = Path(self.mktemp()) / "jobs.sqlite3"
        store = SQLiteJobStore(reactor, path)
        runner = JobRunner(reactor, store, max_running=1, flush_interval=0.01)
        await runner.start()
        done = runner.submit("echo", ["kept"], None)
        for _ in range(100):
            if runner.get(done.id).state == "finished":
                break
            await deferLater(reactor, 0.05)
        running = runner.submit("sleep", ["30"], None)
        queued = runner.submit("echo", ["later"], None)
        await deferLater(reactor, 0.1)
        # Simulate a crash: the store's writes are done, the runner forgotten.
        record = runner._jobs[running.id]
        await store.close()
        runner._store = MemoryJobStore()
        runner._stopping = True
        record.transport.signalProcess("KILL")
        await self._server(store=SQLiteJobStore(reactor, path))
        self.assertEqual((await self._get(done.id))[1]["stdout"], "kept\n")
        back = (await self._get(running.id))[1]
        self.assertEqual((back["state"], back["error"]), ("finished", "interrupted"))
        later = await self._until_finished(queued.id)
        self.assertEqual(later["stdout"], "later\n")


class RunnerStartTests(TestCase):
    """
    L{JobRunner.start} and L{JobService} on a store with earlier jobs.
    """

    async def test_pending_callback_and_running(self) -> None:
        """
        A job stored as running comes back interrupted, and a callback still
        pending is marked failed; both changes are saved.
        """
        from haikutx.jobs.store.sqlite import CallbackOutcome, Job

        store = MemoryJobStore()
        job = Job(
            id="a" * 40, seq=4, command="echo", arguments=(), state="running",
            callback="http://example.com/", callback_outcome=CallbackOutcome("pending", 2),
        )
        store.jobs[job.id] = job
        runner = JobRunner(reactor, store, post_callback=lambda url, body: succeed(200))
        await runner.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(runner.stop()))
        back = store.jobs[job.id]
        self.assertEqual((back.state, back.error), ("finished", "interrupted"))
        self.assertEqual(back.callback_outcome.status, "failed")
        self.assertEqual(runner.submit("echo", [], None).seq, 5)

    async def test_warns_without_whitelist(self) -> None:
        """
        The service logs a warning at start when no whitelist is set, and
        job events carry C{job_id}.
        """
        from twisted.logger import LogLevel, capturedLogs

        from haikutx.jobs.runner import JobService

        runner = JobRunner(reactor, MemoryJobStore(), post_callback=lambda u, b: succeed(200))
        service = JobService(runner)
        with capturedLogs() as events:
            service.startService()
            await runner.wait_ready()
            job = runner.submit("true", [], None)
        self.addCleanup(service.stopService)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertTrue(any("whitelist" in e["log_format"] for e in warnings))
        self.assertTrue(any(e.get("job_id") == job.id for e in events))


class TwistdRestartTests(_HTTPTestCase):
    """
    C{twistd -n haiku --jobs} killed with SIGKILL loses no job.
    """

    timeout = 60

    def _free_port(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def _start(self, port, state):
        env = dict(os.environ, PYTHONPATH=str(_ROOT))
        process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "haiku",
             "--jobs", f"tcp:{port}:interface=127.0.0.1", "--port", "none",
             "--sslport", "none", "--state", str(state)],
            cwd=str(state.parent), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        return process

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
        response = await self.http.post(url, data=b'{"command": "sleep", "args": "3"}')
        running = await response.json()
        for _ in range(100):
            if (await self._job(url, done["id"]))["state"] == "finished":
                break
            await deferLater(reactor, 0.05)
        await deferLater(reactor, 0.7)  # more than one output flush interval
        first.send_signal(signal.SIGKILL)
        first.wait(10)
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
