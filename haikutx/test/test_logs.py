"""
Tests for L{haikutx.logs}: JSON log lines for twistd's C{--logger}.
"""

from __future__ import annotations

import io
from pathlib import Path

from twisted.logger import (
    Logger,
    LogLevel,
    eventAsText,
    eventFromJSON,
    formatEvent,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haikutx.logs import json, text
from haikutx.test.support import free_port, http, until
from haikutx.test.test_service import start_twistd, twistd_argv, wait_for_port


class JSONObserverTests(SynchronousTestCase):
    """
    L{json} writes each event as one line of twisted.logger's JSON.
    """

    def test_one_line_per_event(self) -> None:
        """
        Each event is one line, loaded back by C{eventFromJSON} with its
        fields, even with a newline in a field and a value JSON cannot hold.
        """
        out = io.StringIO()
        log = Logger(observer=json(out), namespace="test")
        log.info("{handler_url} -> {status}", handler_url="a\nb.py", status=200)
        log.warn("odd {thing}", thing=object())
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = eventFromJSON(lines[0])
        self.assertEqual((first["handler_url"], first["status"]), ("a\nb.py", 200))
        self.assertEqual(formatEvent(first), "a\nb.py -> 200")
        self.assertEqual(eventFromJSON(lines[1])["log_namespace"], "test")


class EmittedEventTests(SynchronousTestCase):
    """
    The runtime's own events (L{EventEmitter}'s) read as L{Logger.emit}'s.
    """

    def test_as_logger_events(self) -> None:
        """
        An event emitted with its text made (braces in it kept) is written
        by twistd's text observer and by the JSON observer as the same event
        emitted by a L{Logger} with a format and fields, every field kept.
        """
        from haikutx.events import EventEmitter, literal

        text = "1.2.3.4 GET {odd}.py -> 200 in 0.001s"
        fields = {"client": "1.2.3.4", "status": 200, "worker_pid": None}
        written = []
        for emit in ("emitter", "logger"):
            events: list[dict] = []
            log = Logger(observer=events.append, namespace="haikutx.test")
            if emit == "emitter":
                EventEmitter(log, LogLevel.info)(text, dict(fields))
            else:
                log.info(literal(text), **fields)
            [event] = events
            event["log_time"] = 0.0
            out, lines = io.StringIO(), io.StringIO()
            textFileLogObserver(out)(event)
            json(lines)(event)
            loaded = eventFromJSON(lines.getvalue())
            written.append(
                (out.getvalue(), formatEvent(loaded), eventAsText(loaded),
                 {name: loaded[name] for name in fields})
            )
        self.assertEqual(written[0], written[1])
        self.assertIn("] 1.2.3.4 GET {odd}.py -> 200 in 0.001s\n", written[0][0])
        self.assertEqual(written[0][3], fields)


class TwistdJSONLogTests(TestCase):
    """
    C{twistd -n --logger haikutx.logs.json haiku} logs JSON lines only.
    """

    timeout = 120

    async def test_every_line_is_an_event(self) -> None:
        """
        Every line twistd writes on standard output is a JSON event, among
        them the request event with its fields.
        """
        port = free_port()
        collector = await start_twistd(
            self,
            command=twistd_argv(
                "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                "--workers", "1", "--state", str(Path(self.mktemp()).absolute()),
                twistd=("--pidfile=", "--logger", "haikutx.logs.json"),
            ),
        )
        await wait_for_port(port, collector)
        response = await http(port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.status, 200)

        await until(lambda: b'"handler_url": "hello.py"' in collector.streams[1])
        collector.transport.signalProcess("TERM")
        await collector.ended
        lines = collector.streams[1].splitlines()
        self.assertGreater(len(lines), 3)
        events = [eventFromJSON(line.decode("utf-8")) for line in lines]
        served = [e for e in events if e.get("handler_url") == "hello.py"]
        self.assertEqual(served[0]["status"], 200)
        self.assertIsInstance(served[0]["duration"], float)
        self.assertTrue(all("log_time" in e for e in events))


class TextObserverTests(SynchronousTestCase):
    """
    L{text} writes what twistd's own text observer writes.
    """

    def test_as_twistd_writes(self) -> None:
        """
        Events at any time (several within one second, the next second, one
        just before a second's end, none at all, before the epoch) are
        written as C{textFileLogObserver} writes them.
        """
        times = [
            1_764_633_600.0, 1_764_633_600.5, 1_764_633_600.9999995, 1_764_633_601.25,
            1_764_633_601.999, 1_764_633_602.0, None, -1.5, 0.0,
        ]
        ours, theirs = io.StringIO(), io.StringIO()
        observers = [text(ours), textFileLogObserver(theirs)]
        for when in times:
            for observer in observers:
                event = {
                    "log_format": "{a} -> {b}", "a": "x", "b": 200,
                    "log_namespace": "haikutx.test", "log_level": LogLevel.info,
                }
                if when is not None:
                    event["log_time"] = when
                observer(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertEqual(len(ours.getvalue().splitlines()), len(times))
