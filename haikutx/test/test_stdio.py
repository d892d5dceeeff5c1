"""
Tests for stdio handlers (L{haikutx.child.stdio}, SPEC §3.3): the CGI
environment, the header block, the console and failures, through a real
runtime with real worker and interpreter processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from haikutx.child.cgi import parse_cgi_headers, request_environment
from haikutx.child.params import BadRequestBody
from haikutx.config import bundled_samples
from haikutx.languages import by_name
from haikutx.languages.builtin import BUILTIN
from haikutx.test.support import http, ready, start_runtime, until

SAMPLES = bundled_samples()


def _head(url: str, headers: list[list[str]] | None = None, method: str = "GET") -> dict[str, Any]:
    return {
        "method": method,
        "url": url,
        "headers": headers or [],
        "remote_addr": "127.0.0.1",
        "handler_url": "h.sh",
        "language": "bash",
    }


class EnvironmentTests(SynchronousTestCase):
    def test_cgi_variables(self) -> None:
        """
        The request is described in CGI/1.1 meta-variables, C{HTTP_*} for
        headers, C{HAIKU_PARAMS} and C{HAIKU_PARAM_<identifier>}.
        """
        env = request_environment(
            _head(
                "/a/b?x=1&bad-name=2",
                [["Content-Type", "application/x-www-form-urlencoded"],
                 ["X-Thing", "v1"], ["x-thing", "v2"], ["Host", "h:8"]],
                method="POST",
            ),
            b"y=%24(id)",
        )
        self.assertEqual(env["REQUEST_METHOD"], "POST")
        self.assertEqual(env["PATH_INFO"], "/a/b")
        self.assertEqual(env["QUERY_STRING"], "x=1&bad-name=2")
        self.assertEqual(env["CONTENT_TYPE"], "application/x-www-form-urlencoded")
        self.assertEqual(env["CONTENT_LENGTH"], "9")
        self.assertEqual(env["REMOTE_ADDR"], "127.0.0.1")
        self.assertEqual(env["SERVER_PROTOCOL"], "HTTP/1.1")
        self.assertEqual(env["HTTP_X_THING"], "v1, v2")
        self.assertEqual(env["HTTP_HOST"], "h:8")
        self.assertEqual(json.loads(env["HAIKU_PARAMS"]),
                         {"x": "1", "bad-name": "2", "y": "$(id)"})
        self.assertEqual(env["HAIKU_PARAM_y"], "$(id)")
        self.assertEqual(env["HAIKU_PARAM_x"], "1")
        self.assertNotIn("HAIKU_PARAM_bad-name", env)
        self.assertNotIn("HTTP_CONTENT_TYPE", env)

    def test_large_params_omitted(self) -> None:
        """
        Params too large for the environment are left out and named in
        C{HAIKU_OMITTED}, so that the interpreter still starts.
        """
        big = "x" * 70000
        env = request_environment(
            _head("/?small=1", [["Content-Type", "application/json"]], "POST"),
            json.dumps({"big": big, "also": "y" * 60000}).encode(),
        )
        self.assertEqual(env["HAIKU_OMITTED"], "HAIKU_PARAMS HAIKU_PARAM_big")
        self.assertNotIn("HAIKU_PARAMS", env)
        self.assertEqual(env["HAIKU_PARAM_small"], "1")
        self.assertEqual(len(env["HAIKU_PARAM_also"]), 60000)
        self.assertNotIn("HAIKU_OMITTED", request_environment(_head("/?a=1"), b""))

    def test_proxy_variables(self) -> None:
        """
        The egress proxy's variables are passed on; a client's C{Proxy}
        header never becomes C{HTTP_PROXY} (httpoxy), with or without a
        proxy to pass on.
        """
        proxy = {name: "http://127.0.0.1:3128" for name in
                 ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
        head = _head("/", [["Proxy", "http://evil.example:1/"], ["X-A", "1"]])
        env = request_environment(head, b"", proxy)
        for name in proxy:
            self.assertEqual(env[name], "http://127.0.0.1:3128", name)
        self.assertEqual(env["HTTP_X_A"], "1")
        env = request_environment(head, b"")
        self.assertNotIn("HTTP_PROXY", env)
        self.assertFalse([k for k in env if "proxy" in k.lower()], env)

    def test_malformed_body(self) -> None:
        """
        A body that does not match its content type is L{BadRequestBody}.
        """
        self.assertRaises(
            BadRequestBody, request_environment,
            _head("/", [["Content-Type", "application/json"]], "POST"), b"{nope",
        )


class HeaderBlockTests(SynchronousTestCase):
    def test_status_and_headers(self) -> None:
        self.assertEqual(
            parse_cgi_headers(b"Status: 201 Created\r\nContent-Type: text/plain\r\nX-A: 1"),
            (201, [("Content-Type", "text/plain"), ("X-A", "1")]),
        )

    def test_location(self) -> None:
        """
        C{Location} without C{Status} redirects (302), as CGI says.
        """
        self.assertEqual(parse_cgi_headers(b"Location: /x"), (302, [("Location", "/x")]))

    def test_not_headers(self) -> None:
        """
        Lines that are not headers, or headers naming none of C{Status},
        C{Content-Type}, C{Location}, are body.
        """
        self.assertIsNone(parse_cgi_headers(b"hello world"))
        self.assertIsNone(parse_cgi_headers(b"Note: just text"))

    def test_bad_status(self) -> None:
        self.assertRaises(ValueError, parse_cgi_headers, b"Status: abc")
        self.assertRaises(ValueError, parse_cgi_headers, b"Status: 99")


def _need(language: str) -> None:
    if not by_name(BUILTIN, language).is_available():
        raise SkipTest(f"the {language} interpreter is not installed here")


class StdioRuntimeTests(TestCase):
    """
    Stdio handlers run through a runtime with real workers.
    """

    timeout = 60

    def _start(self, handlers: dict[str, str] | Path, **kw: Any) -> int:
        port, self.pool = start_runtime(self, handlers, workers=1, **kw)
        return port

    def test_samples_agree(self) -> Deferred[None]:
        """
        Every installed echo sample answers the same JSON as C{echo.py} for
        the same request; missing interpreters are skipped by name.
        """
        async def run() -> None:
            port = self._start(SAMPLES)
            results = {}
            missing = []
            for sample, language in [("echo.py", "python"), ("echo.sh", "bash"),
                                     ("echo.js", "node"), ("echo.rb", "ruby"),
                                     ("echo.pl", "perl"), ("echo.php", "php"),
                                     ("echo.lua", "lua")]:
                if not by_name(BUILTIN, language).is_available():
                    missing.append(language)
                    continue
                for body, ctype in [(b"a=1&b=2", "application/x-www-form-urlencoded"),
                                    (b'{"k": [1, "two"], "q": "\\"x\\"\\n"}',
                                     "application/json")]:
                    response = await http(
                        port, f"/some/path?x-haiku-handler={sample}&c=3", method="POST",
                        headers={"Content-Type": ctype}, body=body,
                    )
                    self.assertEqual(response.status, 200, (sample, response.body))
                    self.assertEqual(response.headers["content-type"], "application/json")
                    value = json.loads(response.body)
                    value["params"].pop("x-haiku-handler")
                    results.setdefault(body, {})[sample] = value
            for body, answers in results.items():
                expected = answers["echo.py"]
                self.assertEqual(expected["params"]["c"], "3")
                self.assertEqual(expected["body"], body.decode())
                for sample, value in answers.items():
                    self.assertEqual(value, expected, sample)
            self.assertGreater(len(results[b"a=1&b=2"]), 1)
            if missing:
                raise SkipTest(f"interpreters not installed: {', '.join(missing)}")

        return Deferred.fromCoroutine(run())

    def test_mixed_kinds_reused_worker(self) -> Deferred[None]:
        """
        With one reused worker (C{-r 0}), Python and stdio handlers take
        turns and every request is answered 200: a process confined for one
        kind is replaced before it runs the other.
        """
        _need("bash")

        async def run() -> None:
            port = self._start(SAMPLES, max_requests=0)
            await ready(self.pool)
            for sample in ["hello.py", "echo.sh", "echo.sh", "hello.py", "echo.sh"]:
                response = await http(port, f"/?x-haiku-handler={sample}")
                self.assertEqual(response.status, 200, (sample, response.body))
            self.assertEqual(self.pool.counters["recycled"], 3)
            self.assertEqual(self.pool.counters["started"], 1)

        return Deferred.fromCoroutine(run())

    def test_cgi_header_block(self) -> Deferred[None]:
        """
        A header block at the start of stdout sets status and headers
        (C{\\r\\n} or C{\\n} lines); the rest is the body.
        """
        async def run() -> None:
            port = self._start({
                "crlf.sh": "printf 'Status: 201 Created\\r\\nContent-Type: text/x-a\\r\\n"
                           "X-Extra: 1\\r\\n\\r\\nmade'\n",
                "lf.sh": "printf 'Content-Type: text/x-b\\nSet-Cookie: a=1\\n"
                         "Set-Cookie: b=2\\n\\nbody: here\\n'\n",
                "plain.sh": "echo 'Hello: there'; echo; echo rest\n",
            })
            r = await http(port, "/?x-haiku-handler=crlf.sh")
            self.assertEqual((r.status, r.headers["content-type"], r.headers["x-extra"], r.body),
                             (201, "text/x-a", "1", b"made"))
            r = await http(port, "/?x-haiku-handler=lf.sh")
            self.assertEqual((r.status, r.headers["content-type"], r.body),
                             (200, "text/x-b", b"body: here\n"))
            self.assertIn(b"set-cookie: a=1", r.raw.lower())
            self.assertIn(b"set-cookie: b=2", r.raw.lower())
            r = await http(port, "/?x-haiku-handler=plain.sh")
            self.assertEqual((r.status, r.body), (200, b"Hello: there\n\nrest\n"))

        return Deferred.fromCoroutine(run())

    def test_exit_status(self) -> Deferred[None]:
        """
        An interpreter that exits with a status other than 0 before any
        output is a 500 with the tail of its stderr; after output began the
        response is cut off: no final chunk, the connection closed.
        """
        async def run() -> None:
            port = self._start({
                "die.sh": "echo 'it broke' >&2; exit 3\n",
                "late.sh": "echo partial; exit 3\n",
                "bad.sh": "printf 'Status: nope\\n\\n'\n",
            })
            r = await http(port, "/?x-haiku-handler=die.sh")
            self.assertEqual(r.status, 500)
            self.assertEqual(r.text, "Handler die.sh exited with status 3: it broke\n")
            r = await http(port, "/?x-haiku-handler=late.sh")
            self.assertEqual((r.status, r.body, r.complete), (200, b"partial\n", False))
            self.assertFalse(r.raw.endswith(b"0\r\n\r\n"), r.raw)
            r = await http(port, "/?x-haiku-handler=bad.sh")
            self.assertEqual(r.status, 500)
            self.assertIn("bad header block", r.text)

        return Deferred.fromCoroutine(run())

    def test_console_modes(self) -> Deferred[None]:
        """
        stderr is the console: every x-haiku-console mode works.
        """
        async def run() -> None:
            port = self._start({
                "c.sh": "echo 'to console' >&2\nprintf 'Content-Type: text/plain\\n\\n'\n"
                        "echo out; echo 'and after' >&2\n",
            })
            r = await http(port, "/?x-haiku-handler=c.sh&x-haiku-console=body")
            self.assertEqual((r.status, r.body), (200, b"to console\nand after\n"))
            r = await http(port, "/?x-haiku-handler=c.sh",
                           headers={"x-haiku-console": "trailer"})
            self.assertEqual(r.body, b"out\n")
            self.assertEqual(r.trailers, {"x-haiku-console": "to console%0Aand after%0A"})
            r = await http(port, "/?x-haiku-handler=c.sh&x-haiku-console=none")
            self.assertEqual(r.body, b"out\n")
            self.assertNotIn("x-haiku-console", r.headers)

        return Deferred.fromCoroutine(run())

    def test_params_inert(self) -> Deferred[None]:
        """
        A parameter holding shell syntax reaches the handler as a value and
        never runs.
        """
        async def run() -> None:
            target = Path(self.mktemp()).absolute()
            target.parent.mkdir(parents=True, exist_ok=True)
            port = self._start({
                "p.sh": 'printf "%s|%s" "$HAIKU_PARAM_x" "$HAIKU_PARAMS"\n',
            })
            evil = f"$(touch {target})`touch {target}`"
            from urllib.parse import quote

            r = await http(port, "/?x-haiku-handler=p.sh&x=" + quote(evil))
            self.assertEqual(r.status, 200)
            value, params = r.text.split("|", 1)
            self.assertEqual(value, evil)
            self.assertEqual(json.loads(params)["x"], evil)
            self.assertFalse(target.exists())

        return Deferred.fromCoroutine(run())

    def test_stdin_and_cgi(self) -> Deferred[None]:
        """
        The body is on stdin; the CGI variables describe the request.
        """
        async def run() -> None:
            port = self._start({
                "env.sh": 'printf "%s %s %s %s %s " "$REQUEST_METHOD" "$PATH_INFO" '
                          '"$QUERY_STRING" "$CONTENT_LENGTH" "$HTTP_X_TOKEN"\n'
                          # The sandbox forbids starting cat: a builtin copies stdin.
                          "IFS= read -r -d '' data; printf '%s' \"$data\"\n",
            })
            body = b"line one\nline two" * 1000
            r = await http(port, "/p/q?x-haiku-handler=env.sh&z=9", method="PUT",
                           headers={"X-Token": "abc"}, body=body)
            self.assertEqual(
                r.body,
                f"PUT /p/q x-haiku-handler=env.sh&z=9 {len(body)} abc ".encode() + body,
            )

        return Deferred.fromCoroutine(run())

    def test_large_json_body(self) -> Deferred[None]:
        """
        A JSON body larger than the environment can carry still reaches the
        handler on stdin.
        """
        async def run() -> None:
            port = self._start({"n.sh": 'IFS= read -r -d "" b; printf "%s %s" '
                                        '"${#b}" "$HAIKU_OMITTED"\n'})
            body = json.dumps({"v": "z" * 300000}).encode()
            r = await http(port, "/?x-haiku-handler=n.sh", method="POST",
                           headers={"Content-Type": "application/json"}, body=body)
            self.assertEqual((r.status, r.text), (200, f"{len(body)} HAIKU_PARAMS HAIKU_PARAM_v"))

        return Deferred.fromCoroutine(run())

    def test_malformed_body_400(self) -> Deferred[None]:
        async def run() -> None:
            port = self._start({"ok.sh": "echo fine\n"})
            r = await http(port, "/?x-haiku-handler=ok.sh", method="POST",
                           headers={"Content-Type": "application/json"}, body=b"{bad")
            self.assertEqual(r.status, 400)
            self.assertTrue(r.text.startswith("Bad request body: JSON body does not parse"))

        return Deferred.fromCoroutine(run())

    def test_language_selection(self) -> Deferred[None]:
        """
        An unknown x-haiku-language is 400; x-haiku-language and a C{#!}
        line choose the language of a file without a known extension.
        """
        async def run() -> None:
            port = self._start({
                "noext": "#!/bin/sh\necho from sh\n",
                "script.txt": "echo from override\n",
            })
            r = await http(port, "/?x-haiku-handler=noext&x-haiku-language=cobol")
            self.assertEqual(r.status, 400)
            self.assertIn("unknown language 'cobol'", r.text)
            r = await http(port, "/?x-haiku-handler=noext")
            self.assertEqual((r.status, r.body), (200, b"from sh\n"))
            r = await http(port, "/?x-haiku-handler=script.txt",
                           headers={"x-haiku-language": "bash"})
            self.assertEqual((r.status, r.body), (200, b"from override\n"))

        return Deferred.fromCoroutine(run())

    def test_each_interpreter(self) -> Deferred[None]:
        """
        Each installed interpreter runs inline code with a #! line and reads
        its params from the environment.
        """
        programs = {
            "python3": ("h.py3", ("#!/usr/bin/env python3\nimport os\n"
                                  "print(os.environ['HAIKU_PARAM_n'])\n")),
            "node": ("h.js", "#!/usr/bin/env node\nconsole.log(process.env.HAIKU_PARAM_n)\n"),
            "ruby": ("h.rb", "#!/usr/bin/env ruby\nputs ENV['HAIKU_PARAM_n']\n"),
            "perl": ("h.pl", "#!/usr/bin/perl\nprint \"$ENV{HAIKU_PARAM_n}\\n\";\n"),
            "php": ("h.php", "#!/usr/bin/php\n<?php echo getenv('HAIKU_PARAM_n'), \"\\n\";\n"),
            "lua": ("h.lua", "#!/usr/bin/lua\nprint(os.getenv('HAIKU_PARAM_n'))\n"),
            "tcl": ("h.tcl", "#!/usr/bin/tclsh\nputs $env(HAIKU_PARAM_n)\n"),
            "sh": ("h", "#!/bin/sh\necho \"$HAIKU_PARAM_n\"\n"),
        }

        async def run() -> None:
            port = self._start({name: code for name, code in programs.values()})
            skipped = []
            for language, (name, _) in programs.items():
                if not by_name(BUILTIN, language).is_available():
                    skipped.append(language)
                    continue
                r = await http(port, f"/?x-haiku-handler={name}&n=-42%20x")
                self.assertEqual((r.status, r.body), (200, b"-42 x\n"), language)
            if skipped:
                raise SkipTest(f"interpreters not installed: {', '.join(skipped)}")

        return Deferred.fromCoroutine(run())

    def test_unavailable(self) -> Deferred[None]:
        """
        A handler in a language whose interpreter is missing is 501, before
        any worker is used.
        """
        from twisted.internet import reactor
        from twisted.web.server import Site

        from haikutx.languages.builtin import PythonLanguage, StdioLanguage
        from haikutx.runtime.loader import HandlerLoader
        from haikutx.runtime.resource import HandlerResource
        from haikutx.test.support import write_handlers

        ghost = StdioLanguage("ghost", (), (".gh",), ("ghost",), ("no-such-interp-xyz",),
                              lambda p, c: [p, c])
        directory = write_handlers(Path(self.mktemp()), {"a.gh": "x"})
        resource = HandlerResource(
            reactor, None, HandlerLoader(reactor, directory, 16384),  # type: ignore[arg-type]
            languages=[PythonLanguage(), ghost],
        )
        listening = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)

        async def run() -> None:
            r = await http(listening.getHost().port, "/?x-haiku-handler=a.gh")
            self.assertEqual(r.status, 501)
            self.assertEqual(
                r.text,
                "Handler a.gh is written in ghost, whose interpreter is not installed here.\n",
            )

        return Deferred.fromCoroutine(run())

    def test_time_limit_kills_interpreter(self) -> Deferred[None]:
        """
        An interpreter that outlives C{--maxtime} is answered 500 and killed
        with its worker.
        """
        from haikutx.config import Limits

        async def run() -> None:
            port = self._start({"slow.sh": "while :; do :; done # 31.4159\n"},
                               limits=Limits(max_time=0.5))
            await ready(self.pool)
            r = await http(port, "/?x-haiku-handler=slow.sh")
            self.assertEqual(r.status, 500)
            self.assertIn("did not complete within the time limit of 500 ms", r.text)
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            for _ in range(40):
                if not _running(b"done # 31.4159"):
                    return
                await deferLater(reactor, 0.05, lambda: None)
            self.fail("the interpreter outlived its worker")

        return Deferred.fromCoroutine(run())


def _running(cmdline: bytes) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().rstrip(b"\0") == cmdline:
                    return True
            except OSError:
                pass
    return False


class SandboxedStdioTests(SynchronousTestCase):
    """
    Stdio handlers under the kernel sandbox (L{haikutx.sandbox}), applied
    through the worker's C{exec_sandbox} hook in the interpreter's process:
    each interpreter runs its echo sample, and reads its own installation
    but nothing else.
    """

    def setUp(self) -> None:
        from haikutx.languages.builtin import sandbox_paths
        from haikutx.sandbox import SandboxPolicy, prepare, probe

        layers = probe()
        if layers.landlock_abi < 1 or not layers.seccomp:
            raise SkipTest("Landlock and seccomp are needed for this test")
        exec_paths, read_paths = sandbox_paths(BUILTIN)
        self.prepared = prepare(
            SandboxPolicy(allow_exec=True, exec_paths=exec_paths,
                          extra_read_paths=read_paths, write_paths=("/dev/null",)),
            allow_fork=True,
        )
        self.addCleanup(self.prepared.close)

    def _serve(self, language: str, source: bytes, body: bytes = b"",
             url: str = "/p?x=1") -> tuple[int, bytes]:
        """
        Run one request in an in-process L{Worker} whose interpreters are
        sandboxed; the status and body it answers.
        """
        import os
        import signal

        from haikutx.child import wire
        from haikutx.child.runner import Worker

        to_worker, worker_in = os.pipe()[::-1]
        worker_out, from_worker = os.pipe()[::-1]
        for fd in (to_worker, worker_in, worker_out, from_worker):
            self.addCleanup(os.close, fd)
        worker = Worker(1, control_in=worker_in, control_out=worker_out)
        worker.exec_sandbox = lambda: self.prepared.apply((0, 1, 2), signal.SIGKILL)
        self.addCleanup(worker.loop.close)
        argv = by_name(BUILTIN, language).argv(source)
        head = dict(_head(url, [["Content-Type", "application/x-www-form-urlencoded"]],
                          "POST"), language=language, argv=argv, source="")
        os.write(to_worker, wire.encode_json(wire.REQUEST, head)
                 + wire.encode(wire.BODY, body) + wire.encode(wire.BODY_END))
        worker.run()
        os.set_blocking(from_worker, False)
        data = b""
        while True:
            try:
                chunk = os.read(from_worker, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        status, out = 0, b""
        for kind, payload in wire.FrameReader().feed(data):
            if kind == wire.HEAD:
                status = json.loads(payload)["status"]
            elif kind == wire.DATA:
                out += payload
            elif kind == wire.FAIL:
                failure = json.loads(payload)
                status, out = failure["status"], failure["message"].encode()
        return status, out

    def test_samples(self) -> None:
        missing = []
        for sample, language in [("echo.sh", "bash"), ("echo.js", "node"),
                                 ("echo.rb", "ruby"), ("echo.pl", "perl"),
                                 ("echo.php", "php"), ("echo.lua", "lua")]:
            if not by_name(BUILTIN, language).is_available():
                missing.append(language)
                continue
            status, out = self._serve(language, (SAMPLES / sample).read_bytes(), b"a=1")
            self.assertEqual(status, 200, (sample, out))
            self.assertEqual(json.loads(out), {"body": "a=1", "method": "POST", "path": "/p",
                                               "params": {"x": "1", "a": "1"}}, sample)
        for language, code in [("tcl", b"puts ok"), ("python3", b"print('ok')"),
                               ("sh", b"echo ok")]:
            if by_name(BUILTIN, language).is_available():
                self.assertEqual(self._serve(language, code), (200, b"ok\n"), language)
        if missing:
            raise SkipTest(f"interpreters not installed: {', '.join(missing)}")

    def test_confined(self) -> None:
        """
        A sandboxed interpreter can neither read outside its installation,
        nor write files (but C{/dev/null}); it runs the system's programs,
        but none can make a namespace.
        """
        target = Path(self.mktemp()).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        status, out = self._serve(
            "bash",
            b"read -r line < /etc/shadow && echo \"read:$line\"\n"
            b"echo x > " + str(target).encode() + b" && echo wrote\n"
            b"echo hidden > /dev/null && echo \"null:ok\"\n"
            b"echo \"words:$(echo a b c | wc -w)\"\n"
            b"unshare -U true 2>&1 || echo \"unshare:$?\"\n"
            b"echo done\n",
        )
        self.assertEqual(status, 200, out)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], "null:ok")
        self.assertEqual(lines[1], "words:3")
        self.assertIn("Operation not permitted", lines[2])
        self.assertEqual(lines[3:], ["unshare:1", "done"])
        self.assertNotIn("read:", out.decode())
        self.assertFalse(target.exists())


def _gone(pids: list[int]) -> bool:
    """
    Whether none of C{pids} is a live process (a zombie counts as gone).
    """
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return False
    return True


class StdioProcessTests(TestCase):
    """
    Stdio handlers run real programs (SPEC §3.3) under the full sandbox of
    a real runtime: the system's installed programs only, at most
    C{--maxprocs} at once, their memory together within C{--maxmemory},
    none of them outliving the run; the egress proxy in their environment.
    """

    timeout = 60

    def setUp(self) -> None:
        import os

        from haikutx.sandbox import probe
        from haikutx.sandbox.cgroup import CgroupTree, hierarchies

        if os.geteuid() != 0:
            raise SkipTest("per-slot uids, the network namespace and cgroups need root")
        layers = probe()
        if not layers.landlock_abi or not layers.seccomp:
            raise SkipTest(f"this kernel lacks a sandbox layer: {layers.reasons}")
        if not CgroupTree(*hierarchies()).complete():
            raise SkipTest(f"cgroup v1 pids and memory are needed: {hierarchies()[1]}")
        _need("bash")

    def _start(self, handlers: dict[str, str], **kw: Any) -> int:
        from haikutx.config import Limits

        kw.setdefault("limits", Limits(max_time=10.0))
        port, self.pool = start_runtime(self, handlers, workers=1, **kw)
        return port

    async def test_commands(self) -> None:
        """
        A bash handler runs C{date}, a pipe and C{cat} (of its stdin): its
        commands are programs of the system, started by the handler.
        """
        port = self._start({
            "cmd.sh": 'echo "year:$(date -u +%Y)"\n'
                      "echo piped | tr a-z A-Z\n"
                      "cat\n"
                      "printf 'a\\nb\\nc\\n' | wc -l\n",
        })
        r = await http(port, "/?x-haiku-handler=cmd.sh", method="POST", body=b"from stdin\n")
        self.assertEqual(r.status, 200, r.body)
        import time

        self.assertEqual(
            r.text, f"year:{time.gmtime().tm_year}\nPIPED\nfrom stdin\n3\n"
        )
        self.assertEqual(r.headers["content-type"], "text/plain")

    async def test_status_reports_processes(self) -> None:
        """
        C{/_haiku/status} says how a stdio handler's processes are bounded.
        """
        port = self._start({"ok.sh": "echo ok\n"}, limits=__import__(
            "haikutx.config", fromlist=["Limits"]).Limits(max_procs=12))
        await ready(self.pool)
        r = await http(port, "/_haiku/status")
        layers = json.loads(r.body)["pool"]["sandbox"]["layers"]
        self.assertTrue(layers["processes"].startswith("active: cgroup v1 pids and memory"),
                        layers)
        self.assertIn("at most 12 tasks", layers["processes"])
        self.assertEqual(layers["seccomp"], "active")

    async def test_group_of_its_own_when_it_may_start_processes(self) -> None:
        """
        A child that runs a stdio handler is in a cgroup of its own
        (C{slot<N>/g<M>}) while it runs; one that runs a Python handler,
        which can start no process under seccomp and whose threads its
        slot's uid bounds, is put in none.
        """
        port = self._start({
            "wait.py": "import asyncio\nawait asyncio.sleep(1)\nres.end('ok')\n",
            "wait.sh": "sleep 1\necho ok\n",
        })
        await ready(self.pool)
        worker = next(iter(self.pool.workers))

        async def group_while_running(name: str) -> str:
            pending = Deferred.fromCoroutine(http(port, f"/?x-haiku-handler={name}"))
            await until(lambda: worker.state == "busy", 5)
            child = worker.child_pid
            with open(f"/proc/{child}/cgroup") as f:
                lines = [line for line in f.read().splitlines() if ":pids:" in line]
            self.assertEqual((await pending).status, 200)
            return lines[0].rsplit("/", 1)[-1]

        self.assertRegex(await group_while_running("wait.sh"), r"^g\d+$")
        self.assertNotRegex(await group_while_running("wait.py"), r"^g\d+$")

    async def test_curl_egress(self) -> None:
        """
        C{curl} in a bash handler goes through the egress proxy named by
        C{http_proxy}: it reaches an C{--egress-allow} address on this
        machine, and not another one (the proxy refuses, the target sees
        nothing); a client's C{Proxy} header changes nothing (httpoxy).
        """
        if not Path("/usr/bin/curl").exists():
            raise SkipTest("curl is not installed")
        from twisted.internet import reactor
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        hits: list[str] = []

        class Counted(Resource):
            isLeaf = True

            def __init__(self, name: str) -> None:
                super().__init__()
                self.name = name

            def render_GET(self, request: Any) -> bytes:
                hits.append(self.name)
                return f"hello from {self.name}".encode()

        allowed = reactor.listenTCP(0, Site(Counted("allowed")), interface="127.0.0.1")
        self.addCleanup(allowed.stopListening)
        denied = reactor.listenTCP(0, Site(Counted("denied")), interface="127.0.0.1")
        self.addCleanup(denied.stopListening)
        a, d = allowed.getHost().port, denied.getHost().port
        port = self._start(
            {"curl.sh": 'echo "proxy:$HTTP_PROXY|$http_proxy|$HTTPS_PROXY|$https_proxy"\n'
                        'curl -sS -o /dev/null -w "%{http_code}\\n" '
                        '"http://127.0.0.1:$HAIKU_PARAM_port/" 2>&1\n'
                        'curl -sS "http://127.0.0.1:$HAIKU_PARAM_port/" 2>&1; echo\n'},
            egress_allow=(f"127.0.0.1:{a}",),
        )
        r = await http(port, f"/?x-haiku-handler=curl.sh&port={a}",
                       headers={"Proxy": "http://127.0.0.1:9/"})
        self.assertEqual(r.status, 200, r.body)
        lines = r.text.splitlines()
        proxy = lines[0][len("proxy:"):].split("|")
        self.assertEqual(len(set(proxy)), 1, lines[0])
        self.assertTrue(proxy[0].startswith("http://127.0.0.1:"), lines[0])
        self.assertNotIn(":9/", proxy[0])
        self.assertEqual(lines[1:], ["200", "hello from allowed"])
        r = await http(port, f"/?x-haiku-handler=curl.sh&port={d}")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.text.splitlines()[1], "403", r.text)
        self.assertEqual(hits, ["allowed", "allowed"])

    async def test_fork_bomb_bounded(self) -> None:
        """
        A handler forking as many processes as it can gets C{--maxprocs}
        at once (itself included), no more and no fewer, and none of them
        outlives its run.
        """
        _need("python3")
        from haikutx.config import Limits

        bomb = (
            "#!/usr/bin/env python3\n"
            "import os, sys, time\n"
            "pids = []\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    pids.append(pid)\n"
            "print(' '.join(map(str, pids)))\n"
        )
        port = self._start({"bomb.py3": bomb}, limits=Limits(max_time=10.0, max_procs=8))
        r = await http(port, "/?x-haiku-handler=bomb.py3")
        self.assertEqual(r.status, 200, r.body)
        pids = [int(p) for p in r.text.split()]
        # All of its --maxprocs: the worker's own bookkeeping takes no task
        # of the run's (a child watcher thread, started once the
        # interpreter ran, once found none left and failed the run).
        self.assertEqual(len(pids), 7)
        self.assertTrue(_gone(pids), pids)
        # The slot is usable again at once: the next run forks as many.
        r = await http(port, "/?x-haiku-handler=bomb.py3")
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(len(r.text.split()), len(pids))

    async def test_memory_together(self) -> None:
        """
        Processes that each stay below C{--maxmemory} but together exceed
        it are killed, the whole run with them: a 500 naming the cause.
        """
        _need("python3")
        from haikutx.config import Limits

        grow = "python3 -c 'import time; b = b\"x\" * (50 << 20); time.sleep(20)'"
        port = self._start(
            {"grow.sh": f"for i in 1 2 3 4; do {grow} & done\nwait\necho survived\n"},
            limits=Limits(max_time=15.0, max_memory=128 << 20),
        )
        await ready(self.pool)
        started = reactor_seconds()
        r = await http(port, "/?x-haiku-handler=grow.sh")
        self.assertEqual(r.status, 500, r.body)
        self.assertIn(
            "Handler grow.sh did not complete: the worker process was killed: its processes "
            "together exceeded the memory limit of 128 MiB", r.text,
        )
        self.assertLess(reactor_seconds() - started, 10)

    async def test_nothing_left_behind(self) -> None:
        """
        Processes a handler leaves running in the background, in a new
        session (C{setsid}) or forked twice are killed when its run ends,
        before the response ends; the response does not wait for them.
        """
        port = self._start({
            "left.sh": "sleep 101 &\necho \"bg $!\"\n"
                       "setsid sleep 102 &\necho \"setsid $!\"\n"
                       "(sleep 103 & echo \"double $!\")\n"
                       "(setsid sh -c 'sleep 104 & echo \"deep $!\"' &)\n"
                       "sleep 0.2\necho done\n",
        })
        started = reactor_seconds()
        r = await http(port, "/?x-haiku-handler=left.sh")
        self.assertEqual(r.status, 200, r.body)
        self.assertLess(reactor_seconds() - started, 5)
        lines = dict(line.split(" ", 1) for line in r.text.splitlines() if " " in line)
        self.assertEqual(sorted(lines), ["bg", "deep", "double", "setsid"], r.text)
        self.assertTrue(r.text.endswith("done\n"))
        pids = [int(v) for v in lines.values()]
        self.assertTrue(_gone(pids), [Path(f"/proc/{p}/cmdline").read_bytes()
                                      for p in pids if not _gone([p])])

    async def test_nothing_left_behind_shared_uid(self) -> None:
        """
        With a uid shared by every slot (C{--user}), the worker cannot kill
        all it may signal; a process that left the interpreter's process
        group does not hold the response open, and the cgroup ends it with
        its worker's process.
        """
        from haikutx.test.support import until

        port = self._start(
            {"left.sh": "setsid sleep 108 &\necho \"setsid $!\"\necho done\n"},
            user="nobody",
        )
        started = reactor_seconds()
        r = await http(port, "/?x-haiku-handler=left.sh")
        self.assertEqual(r.status, 200, r.body)
        self.assertLess(reactor_seconds() - started, 5)
        pid = int(r.text.split()[1])
        self.assertTrue(r.text.endswith("done\n"))
        await until(lambda: _gone([pid]), 5.0, lambda: f"process {pid} outlived its run")

    async def test_time_limit_ends_every_process(self) -> None:
        """
        When the time limit kills a run, the processes it started die too.
        """
        from haikutx.config import Limits
        from haikutx.test.support import until

        port = self._start(
            {"hang.sh": "setsid sleep 105 &\necho \"pid $!\"\nsleep 100\n"},
            limits=Limits(max_time=1.0),
        )
        await ready(self.pool)
        r = await http(port, "/?x-haiku-handler=hang.sh")
        self.assertEqual((r.status, r.complete), (200, False))
        pid = int(r.text.split()[1])
        await until(lambda: _gone([pid]), 5.0, lambda: f"process {pid} outlived its run")

    async def test_client_gone_ends_every_process(self) -> None:
        """
        When the client of a running stdio handler goes away, the run ends,
        every process it started with it, and the slot serves again.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import ClientFactory, Protocol

        from haikutx.test.support import until

        port = self._start({
            "hang.sh": "setsid sleep 107 &\necho \"pid $!\"\nsleep 100\n",
            "ok.sh": "echo ok\n",
        })
        await ready(self.pool)
        seen: list[bytes] = []
        got_pid: Deferred[None] = Deferred()

        class Leaving(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET /?x-haiku-handler=hang.sh HTTP/1.1\r\nHost: x\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                seen.append(data)
                if b"pid " in b"".join(seen) and not got_pid.called:
                    got_pid.callback(None)
                    self.transport.abortConnection()

        reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(Leaving))
        await got_pid
        text = b"".join(seen).split(b"pid ", 1)[1]
        pid = int(text.split(b"\r\n", 1)[0].split(b"\n", 1)[0])
        await until(lambda: _gone([pid]), 5.0, lambda: f"process {pid} outlived its run")
        r = await http(port, "/?x-haiku-handler=ok.sh")
        self.assertEqual((r.status, r.text), (200, "ok\n"))

    async def test_cannot_leave_its_group(self) -> None:
        """
        A handler cannot move itself out of its cgroup, lift its limits,
        or signal anything outside its run (init, the server).
        """
        import os

        from haikutx.sandbox.cgroup import hierarchies

        found, _ = hierarchies()
        port = self._start({"escape.sh": "eval \"$HAIKU_PARAM_script\"\n"})
        targets = [f"{d}/cgroup.procs" for d in found.values()]
        targets += [f"{d}/slot0/g0/pids.max" for d in
                    self.pool._spawner._cgroups.directories.values()]
        script = "".join(f'echo $$ > {t} 2>/dev/null; echo "{t}:$?"\n' for t in targets)
        script += f'kill -0 1 2>/dev/null; echo "init:$?"\nkill -0 {os.getpid()} 2>/dev/null; ' \
                  'echo "server:$?"\n'
        from urllib.parse import quote

        r = await http(port, "/?x-haiku-handler=escape.sh&script=" + quote(script))
        self.assertEqual(r.status, 200, r.body)
        for line in r.text.splitlines():
            self.assertTrue(line.endswith(":1"), r.text)
        self.assertEqual(len(r.text.splitlines()), len(targets) + 2)

    async def test_no_exec_from_writable_places(self) -> None:
        """
        A handler cannot run a program from a place that can be written
        (C{/tmp}, C{/dev/shm}), even one put there by root.
        """
        import os
        import shutil

        placed = []
        for directory in ("/tmp", "/dev/shm"):
            if os.path.isdir(directory):
                target = f"{directory}/haikutx-exec-{os.getpid()}"
                shutil.copy("/usr/bin/true", target)
                os.chmod(target, 0o755)
                self.addCleanup(os.unlink, target)
                placed.append(target)
        script = "".join(f'{t}; echo "{t}:$?"\n' for t in placed)
        port = self._start({"x.sh": script + "/usr/bin/true; echo \"true:$?\"\n"})
        r = await http(port, "/?x-haiku-handler=x.sh")
        self.assertEqual(r.status, 200, r.body)
        for target in placed:
            self.assertIn(f"{target}:126", r.text)
        self.assertIn("true:0", r.text)

    async def test_killed_after_output_looks_truncated(self) -> None:
        """
        A handler killed after its output began leaves the response without
        its final chunk and the connection closed, and the log names the
        cause.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        port = self._start({"die.sh": "echo started\nkill -9 $$\n"})
        r = await http(port, "/?x-haiku-handler=die.sh")
        self.assertEqual((r.status, r.body, r.complete), (200, b"started\n", False))
        self.assertIn(b"transfer-encoding: chunked", r.raw.lower())
        self.assertNotIn(b"\r\n0\r\n\r\n", r.raw)
        reasons = [e.get("reason", "") for e in events]
        self.assertTrue(
            any("Handler die.sh was killed by signal 9" in str(x) for x in reasons), reasons
        )


def reactor_seconds() -> float:
    from twisted.internet import reactor

    return reactor.seconds()  # type: ignore[attr-defined]
