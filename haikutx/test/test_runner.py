"""
A child's worker (L{haikutx.child.runner.Worker}) in a real process of its
own, driven over a real socketpair as the server drives it: it serves
handlers that answer before they return without its asyncio loop (whose
descriptors it does not even make), and moves to the loop for good when a
handler leaves something for later; either way the handler API and the
heartbeat's challenges behave as they did.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from haikutx.child import wire
from haikutx.config import Limits
from haikutx.test.support import http, ready, start_runtime

ROOT = Path(__file__).resolve().parent.parent.parent

#: How long a test waits for any one frame (a bound, never a speed check).
WAIT = 10.0

HELLO = "res.write_head(200, {'Content-Type': 'text/plain'})\nres.end('hello')\n"


def _head(source: str, url: str = "/") -> dict[str, Any]:
    return {
        "method": "GET",
        "url": url,
        "headers": [["Host", "localhost"]],
        "remote_addr": "127.0.0.1",
        "handler_url": "t.py",
        "source": source,
        "language": "python",
    }


class _WorkerProcess:
    """
    A worker serving on one end of a socketpair in a process of its own.
    """

    def __init__(self, case: TestCase, max_requests: int = 0, stderr: Any = None) -> None:
        self._server, child = socket.socketpair()
        self._server.settimeout(WAIT)
        self.process = subprocess.Popen(
            [sys.executable, "-c",
             "import sys\nfrom haikutx.child.runner import Worker\n"
             f"Worker({max_requests}, int(sys.argv[1])).run()\n",
             str(child.fileno())],
            pass_fds=(child.fileno(),), cwd=ROOT, stderr=stderr,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        child.close()
        self._reader = wire.FrameReader()
        self._frames: list[tuple[int, bytes]] = []
        case.addCleanup(self.close)

    def close(self) -> None:
        self._server.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def send(self, data: bytes) -> None:
        self._server.sendall(data)

    def request(self, source: str, url: str = "/") -> None:
        """
        Send a request for a handler of C{source}, body included.
        """
        self.send(wire.encode_json(wire.REQUEST, _head(source, url)) + wire.encode(wire.BODY_END))

    def frame(self) -> tuple[int, bytes]:
        """
        The next frame the worker sends (waiting at most L{WAIT} seconds).
        """
        while not self._frames:
            data = self._server.recv(65536)
            if not data:
                raise EOFError("the worker closed its channel")
            self._frames.extend(self._reader.feed(data))
        return self._frames.pop(0)

    def answer(self) -> tuple[int, str, list[int]]:
        """
        Read frames up to the end of a response: its status, its body, and
        the kinds of every frame read (challenges' answers included).
        """
        status, body, kinds = 0, b"", []
        while True:
            kind, payload = self.frame()
            kinds.append(kind)
            if kind == wire.HEAD:
                status = json.loads(payload)["status"]
            elif kind == wire.DATA:
                body += payload
            elif kind == wire.FAIL:
                failure = json.loads(payload)
                return failure["status"], failure["message"], kinds
            elif kind == wire.FINISH:
                return status, body.decode(), kinds

    def serve(self, source: str, url: str = "/") -> tuple[int, str]:
        self.request(source, url)
        status, body, _ = self.answer()
        return status, body

    def descriptors(self) -> list[str]:
        """
        What the worker's process holds, but for its standard streams and
        its channel: the targets of its other descriptors.
        """
        base = f"/proc/{self.process.pid}/fd"
        held = []
        for name in os.listdir(base):
            if int(name) > 2:
                try:
                    held.append(os.readlink(f"{base}/{name}"))
                except FileNotFoundError:
                    pass
        return sorted(held)


def _kinds(held: list[str]) -> list[str]:
    return sorted(target.split(":")[0] for target in held)


class SynchronousPathTests(TestCase):
    """
    Handlers that answer before they return are served without the event
    loop; the others move the process to it, and nothing a handler sees
    changes.
    """

    def setUp(self) -> None:
        self.worker = _WorkerProcess(self)

    def test_synchronous_handler_makes_no_loop(self) -> None:
        """
        A process that served only handlers that answer before they return
        holds its channel and nothing else: no epoll, no self-pipe.
        """
        for _ in range(3):
            self.assertEqual(self.worker.serve(HELLO), (200, "hello"))
        self.assertEqual(_kinds(self.worker.descriptors()), ["socket"])

    def test_awaiting_then_synchronous(self) -> None:
        """
        A handler that awaits is served on the loop (which the process
        makes then, and keeps); handlers that answer at once are served
        right after it, by the same process.
        """
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))
        awaiting = "import asyncio\nawait asyncio.sleep(0.01)\nres.end('awaited')\n"
        self.assertEqual(self.worker.serve(awaiting), (200, "awaited"))
        self.assertIn("anon_inode:[eventpoll]", self.worker.descriptors())
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))
        self.assertEqual(self.worker.serve(awaiting), (200, "awaited"))

    def test_timer(self) -> None:
        """
        A handler that ends its response from a timer is answered.
        """
        source = "res.write('a')\nset_timeout(lambda: res.end('b'), 10)\n"
        self.assertEqual(self.worker.serve(source), (200, "ab"))
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))

    def test_timers_of_finished_runs_never_fire(self) -> None:
        """
        Timers a handler set and did not need (it answered at once) are
        cancelled with its run, and fire in no later run.
        """
        source = (
            "import sys\n"
            "set_timeout(lambda: setattr(sys, 'fired', True), 0)\n"
            "set_interval(lambda: setattr(sys, 'fired', True), 1)\n"
            "res.end('set')\n"
        )
        for _ in range(3):
            self.assertEqual(self.worker.serve(source), (200, "set"))
        time.sleep(0.05)
        check = "import sys\nres.end(str(getattr(sys, 'fired', False)))\n"
        self.assertEqual(self.worker.serve(check), (200, "False"))
        self.assertEqual(_kinds(self.worker.descriptors()), ["socket"])

    def test_write_after_end(self) -> None:
        """
        A handler that writes after C{res.end} gets its exception, which
        changes nothing: the response is what it ended, and the process
        serves the next request.
        """
        source = (
            "res.end('ended')\n"
            "try:\n    res.write('more')\nexcept RuntimeError as e:\n    print(e)\n"
            "res.write('again')\n"
        )
        self.assertEqual(self.worker.serve(source), (200, "ended"))
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))

    def test_running_loop(self) -> None:
        """
        Handler code runs with the process's loop as the running loop,
        whichever path serves it: a callback or a task it schedules there
        runs, and may answer.
        """
        source = (
            "import asyncio\n"
            "loop = asyncio.get_running_loop()\n"
            "now = loop.is_running()\n"
            "try:\n    loop.run_until_complete(asyncio.sleep(0))\n"
            "except RuntimeError as e:\n    refused = str(e)\n"
            "loop.call_soon(lambda: res.end('%s %s %s' % (now, refused, loop.is_running())))\n"
        )
        self.assertEqual(
            self.worker.serve(source), (200, "True This event loop is already running True")
        )
        worker = _WorkerProcess(self)
        tasked = (
            "import asyncio\n"
            "async def later():\n    res.end('task')\n"
            "asyncio.ensure_future(later())\n"
        )
        self.assertEqual(worker.serve(tasked), (200, "task"))

    def test_task_left_after_answer(self) -> None:
        """
        A task a handler scheduled on the loop and left behind its answer
        runs, as it would on the loop (its first step at once).
        """
        source = (
            "import asyncio, sys\n"
            "async def left():\n"
            "    sys.steps = ['started']\n"
            "    await asyncio.sleep(0.01)\n"
            "    sys.steps.append('slept')\n"
            "asyncio.get_running_loop().create_task(left())\n"
            "res.end('left')\n"
        )
        self.assertEqual(self.worker.serve(source), (200, "left"))
        check = "import sys\nres.end(','.join(getattr(sys, 'steps', [])))\n"
        self.assertIn(self.worker.serve(check), [(200, "started"), (200, "started,slept")])

    def test_thread_wakes_loop(self) -> None:
        """
        A handler's thread that hands the answer to the loop
        (C{call_soon_threadsafe}) wakes it, whether or not the loop's
        descriptors were made yet.
        """
        source = (
            "import asyncio, threading, time\n"
            "loop = asyncio.get_running_loop()\n"
            "def work(pause):\n"
            "    time.sleep(pause)\n"
            "    loop.call_soon_threadsafe(res.end, 'from a thread')\n"
            "threading.Thread(target=work, args=(float(req.query['pause']),)).start()\n"
        )
        for pause in ("0", "0.05"):
            worker = _WorkerProcess(self)
            self.assertEqual(worker.serve(source, f"/?pause={pause}"), (200, "from a thread"))
            self.assertEqual(worker.serve(HELLO), (200, "hello"))

    def test_thread_after_answer(self) -> None:
        """
        A thread a handler left running after its answer hands the loop a
        callback: the loop runs it then, not only when the next frame
        arrives.
        """
        worker = _WorkerProcess(self, stderr=subprocess.PIPE)
        source = (
            "import asyncio, os, threading, time\n"
            "loop = asyncio.get_running_loop()\n"
            "def later():\n"
            "    time.sleep(0.05)\n"
            "    loop.call_soon_threadsafe(os.write, 2, b'late\\n')\n"
            "threading.Thread(target=later).start()\n"
            "res.end('answered')\n"
        )
        self.assertEqual(worker.serve(source), (200, "answered"))
        assert worker.process.stderr is not None
        ready, _, _ = select.select([worker.process.stderr], [], [], WAIT)
        self.assertTrue(ready, "the callback did not run")
        self.assertEqual(worker.process.stderr.readline(), b"late\n")
        self.assertEqual(worker.serve(HELLO), (200, "hello"))

    def test_challenges_between_and_during_runs(self) -> None:
        """
        A challenge is answered between requests, and while a handler
        awaits.
        """
        self.worker.send(wire.encode(wire.CHALLENGE, b"first"))
        self.assertEqual(self.worker.frame(), (wire.ANSWER, b"first"))
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))
        self.worker.request(
            "import asyncio\nres.write('waiting')\n"
            "await asyncio.sleep(0.2)\nres.end()\n"
        )
        self.assertEqual(self.worker.frame()[0], wire.HEAD)
        self.assertEqual(self.worker.frame(), (wire.DATA, b"waiting"))
        self.worker.send(wire.encode(wire.CHALLENGE, b"during"))
        self.assertEqual(self.worker.frame(), (wire.ANSWER, b"during"))
        self.assertEqual(self.worker.frame()[0], wire.FINISH)

    def test_blocking_handler_stops_answers(self) -> None:
        """
        While a handler blocks, challenges go unanswered (that is how the
        heartbeat catches it); they are answered once it returns.
        """
        self.worker.request(
            "import time\nres.write('blocking')\ntime.sleep(1.5)\nres.end('done')\n"
        )
        self.assertEqual(self.worker.frame()[0], wire.HEAD)
        self.assertEqual(self.worker.frame(), (wire.DATA, b"blocking"))
        self.worker.send(wire.encode(wire.CHALLENGE, b"blocked"))
        self.worker._server.settimeout(0.5)
        self.assertRaises(TimeoutError, self.worker.frame)
        self.worker._server.settimeout(WAIT)
        self.assertEqual(self.worker.frame(), (wire.DATA, b"done"))
        self.assertEqual(self.worker.frame()[0], wire.FINISH)
        self.assertEqual(self.worker.frame(), (wire.ANSWER, b"blocked"))

    def test_quota(self) -> None:
        """
        A worker given a request quota serves that many and exits.
        """
        worker = _WorkerProcess(self, max_requests=2)
        self.assertEqual(worker.serve(HELLO), (200, "hello"))
        self.assertEqual(worker.serve(HELLO), (200, "hello"))
        self.assertEqual(worker.process.wait(WAIT), 0)

    def test_server_gone(self) -> None:
        """
        The worker exits when the server closes its channel.
        """
        self.assertEqual(self.worker.serve(HELLO), (200, "hello"))
        self.worker._server.shutdown(socket.SHUT_WR)
        self.assertEqual(self.worker.process.wait(WAIT), 0)


#: Handlers for the runtime's tests below.
HANDLERS = {
    "hello.py": HELLO,
    "fds.py": (
        "import os\n"
        "def held(fd):\n"
        "    try:\n        os.fstat(fd)\n    except OSError:\n        return False\n"
        "    return True\n"
        "res.end(' '.join(str(fd) for fd in range(256) if held(fd)))\n"
    ),
    "spin.py": "while True:\n    pass\n",
    "await.py": "import asyncio\nawait asyncio.sleep(0.01)\nres.end('awaited')\n",
    "late.py": "res.write('a')\nset_timeout(lambda: res.end('b'), 10)\n",
    "after-end.py": "res.end('ended')\nres.write('more')\n",
    "random.py": (
        "import os, random, ssl\n"
        "res.end(' '.join([str(random.getrandbits(64)), ssl.RAND_bytes(8).hex(),"
        " os.urandom(8).hex(), str(os.getpid())]))\n"
    ),
}


class RuntimeTests(TestCase):
    """
    The same, through the runtime: a fresh process per request (C{-r 1})
    and a reused one (C{-r 0}).
    """

    def _runtime(self, max_requests: int) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self, HANDLERS, workers=1, max_requests=max_requests,
            limits=Limits(max_time=30), keepalive_interval=0.2, keepalive_timeout=0.5,
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def _check_all(self) -> None:
        fds = await http(self.port, "/?x-haiku-handler=fds.py")
        self.assertEqual((fds.status, fds.text), (200, "0 1 2 3"))
        for name, text in [("hello.py", "hello"), ("await.py", "awaited"), ("late.py", "ab"),
                           ("after-end.py", "ended"), ("hello.py", "hello")]:
            response = await http(self.port, f"/?x-haiku-handler={name}")
            self.assertEqual((response.status, response.text), (200, text), name)
        spin = await http(self.port, "/?x-haiku-handler=spin.py")
        self.assertEqual(spin.status, 500)
        self.assertIn("did not answer a heartbeat within 500 ms", spin.text)
        after = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual((after.status, after.text), (200, "hello"))

    async def test_fresh_processes(self) -> None:
        """
        C{-r 1}: a synchronous handler's process holds its standard streams
        and its channel only; every kind of handler is answered; one that
        blocks is caught by the heartbeat.
        """
        await self._runtime(1)
        await self._check_all()

    async def test_random_per_process(self) -> None:
        """
        C{-r 1}: each process (forked by its zygote's forker, without the
        C library's fork) has random numbers of its own: Python's, OpenSSL's
        and the kernel's.
        """
        await self._runtime(1)
        answers = []
        for _ in range(3):
            response = await http(self.port, "/?x-haiku-handler=random.py")
            self.assertEqual(response.status, 200, response.text)
            answers.append(response.text.split())
        for column in zip(*answers, strict=True):
            self.assertEqual(len(set(column)), 3, answers)

    async def test_reused_process(self) -> None:
        """
        C{-r 0}: the same, one process serving them in turn.
        """
        await self._runtime(0)
        await self._check_all()


class FrameTests(TestCase):
    """
    What a run sends is what the json module would have made.
    """

    def test_head_frame(self) -> None:
        """
        The C{HEAD} frame made by hand is byte for byte the one
        C{wire.encode_json} makes, for odd statuses and headers too.
        """
        from haikutx.child.run import _encode_head

        cases = [
            (200, []),
            (201, [["Content-Type", "text/plain"], ["X-Two", "a"], ["X-Two", "b"]]),
            (200, [["X-Odd", 'é "quoted" \\ \n \x00 \u2028 \ud800 \U0001f600']]),
            ("202", [["A", "b"]]),
            (True, []),
            (2.5, [["A", "b"]]),
        ]
        for status, pairs in cases:
            self.assertEqual(
                _encode_head(status, pairs),
                wire.encode_json(wire.HEAD, {"status": status, "headers": pairs}),
                (status, pairs),
            )


class CodeCacheTests(TestCase):
    """
    A process compiles each handler's source once.
    """

    def test_same_source_compiled_once(self) -> None:
        """
        The same URL and source give the same code object; a changed
        source under the same URL is compiled anew.
        """
        from haikutx.child.runner import CodeCache

        codes = CodeCache()
        first = codes.compile("h.py", b"x = 1\n")
        self.assertIs(codes.compile("h.py", b"x = 1\n"), first)
        changed = codes.compile("h.py", b"x = 2\n")
        self.assertIsNot(changed, first)
        self.assertIsNot(codes.compile("other.py", b"x = 1\n"), first)
