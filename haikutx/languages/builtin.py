# -*- test-case-name: haikutx.test.test_languages -*-
"""
The built-in languages: Python handlers (SPEC §3.1) and the stdio
interpreters (SPEC §3.3).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from attrs import field, frozen
from twisted.plugin import IPlugin
from zope.interface import implementer

from haikutx.interfaces import ILanguage

#: Where interpreters are looked for (not the server's C{$PATH}: a
#: handler's interpreter should not depend on how the server was started).
SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"

_TCL_BOOT = str(Path(__file__).with_name("boot.tcl"))

#: Where the system's installed programs live: a stdio handler may run the
#: programs beneath these (those that are owned by root and writable by no
#: one else, see L{program_paths}), and nothing it could have written.
PROGRAM_PATHS = (
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
    "/usr/libexec",
    "/usr/lib",
    "/lib",
    "/usr/lib64",
    "/lib64",
)


@implementer(IPlugin, ILanguage)
@frozen
class PythonLanguage:
    """
    Python handlers with C{req}, C{res} and C{console}, run in the worker.
    """

    name: str = "python"
    aliases: tuple[str, ...] = ("py",)
    extensions: tuple[str, ...] = (".py",)
    interpreters: tuple[str, ...] = ()
    runner: str = "python"

    def interpreter(self) -> str | None:
        return sys.executable

    def is_available(self) -> bool:
        return True

    def argv(self, source: bytes) -> list[str] | None:
        return None


def _inline(flag: str) -> Callable[[str, str], list[str]]:
    """
    A command line that passes the code after C{flag} (C{-c}, C{-e}).
    """

    def build(program: str, code: str) -> list[str]:
        return [program, flag, code]

    return build


def _node(program: str, code: str) -> list[str]:
    # Without the JIT V8 fits the sandbox's address-space limit (it reserves
    # ~1 GiB for JIT code otherwise) and maps no writable+executable pages.
    return [program, "--jitless", "--no-expose-wasm", "-e", code]


def _shell(program: str, code: str) -> list[str]:
    return [program, "-c", code, "haiku"]


def _php(program: str, code: str) -> list[str]:
    # eval in HTML mode, so that a file starting with <?php runs as it would
    # from disk; the code is an argument, never part of the eval'd string.
    if code.startswith("#!"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
    return [program, "-r", 'eval("?>" . $argv[1]);', "--", code]


def _lua(program: str, code: str) -> list[str]:
    # lua skips a #! line only in files: make it a comment.
    if code.startswith("#!"):
        code = "--" + code
    # attached: lua refuses a separate -e argument that starts with "-"
    return [program, "-e" + code]


def _tcl(program: str, code: str) -> list[str]:
    return [program, _TCL_BOOT, code]


@implementer(IPlugin, ILanguage)
@frozen
class StdioLanguage:
    """
    A language run by an interpreter process: the request body on its stdin,
    its stdout the response (with an optional CGI header block), its stderr
    the console.

    @ivar programs: interpreter program names tried in order.
    @ivar build: makes the command line from the interpreter's path and the
        code.
    @ivar read_paths: what the interpreter reads besides the system
        libraries (L{haikutx.sandbox.policy.SYSTEM_READ_PATHS}): its own
        modules and configuration; granted to the sandbox when they exist.
    """

    name: str
    aliases: tuple[str, ...]
    extensions: tuple[str, ...]
    interpreters: tuple[str, ...]
    programs: tuple[str, ...]
    build: Callable[[str, str], list[str]] = field(eq=False, repr=False)
    runner: str = "stdio"
    read_paths: tuple[str, ...] = ()

    def interpreter(self) -> str | None:
        for program in self.programs:
            found = shutil.which(program, path=SEARCH_PATH)
            if found:
                return found
        return None

    def is_available(self) -> bool:
        return self.interpreter() is not None

    def argv(self, source: bytes) -> list[str] | None:
        program = self.interpreter()
        if program is None:
            raise ValueError(f"the {self.name} interpreter is not installed")
        if b"\0" in source:
            raise ValueError("the handler contains NUL bytes")
        return self.build(program, source.decode("utf-8", "surrogateescape"))


BUILTIN: tuple[PythonLanguage | StdioLanguage, ...] = (
    PythonLanguage(),
    StdioLanguage(
        "python3", ("python-script",), (".py3",), ("python3",),
        ("python3",), _inline("-c"),
    ),
    StdioLanguage(
        "bash", ("shell",), (".sh", ".bash"), ("bash",), ("bash",), _shell,
    ),
    StdioLanguage("sh", (), (), ("sh", "dash"), ("sh",), _shell),
    StdioLanguage(
        "node", ("javascript", "js", "nodejs"), (".js", ".cjs"), ("node", "nodejs"),
        ("node", "nodejs"), _node,
    ),
    StdioLanguage(
        "ruby", ("rb",), (".rb",), ("ruby",), ("ruby",), _inline("-e"),
        read_paths=("/usr/share/rubygems-integration", "/var/lib/gems", "/usr/share/ruby"),
    ),
    StdioLanguage(
        "perl", ("pl",), (".pl",), ("perl",), ("perl",), _inline("-e"),
        read_paths=("/usr/share/perl", "/usr/share/perl5", "/usr/local/share/perl",
                    "/etc/perl"),
    ),
    StdioLanguage(
        "php", (), (".php",), ("php",), ("php",), _php,
        read_paths=("/etc/php", "/usr/share/php"),
    ),
    StdioLanguage(
        "lua", (), (".lua",), ("lua", "lua5.4", "lua5.3", "lua5.1", "luajit"),
        ("lua5.4", "lua", "lua5.3", "lua5.1", "luajit"), _lua,
        read_paths=("/usr/share/lua", "/usr/local/share/lua"),
    ),
    StdioLanguage(
        "tcl", ("tclsh",), (".tcl",), ("tclsh", "tclsh8.6"), ("tclsh", "tclsh8.6"),
        _tcl, read_paths=("/usr/share/tcltk", "/usr/share/tcltk/tcl8.6", _TCL_BOOT),
    ),
)


def _only_root_can_write(path: str) -> bool:
    """
    Whether C{path} and every directory above it are owned by root and
    writable by no other user or group.
    """
    import os
    import stat

    current = path
    while True:
        try:
            info = os.stat(current)
        except OSError:
            return False
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


def program_paths(candidates: tuple[str, ...] = PROGRAM_PATHS) -> tuple[str, ...]:
    """
    The real paths of the system program directories that a stdio handler
    may execute from: those of C{candidates} that exist and that only root
    can write (so a handler never runs a file that someone, itself
    included, could have put there).
    """
    import os

    found: dict[str, None] = {}
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and _only_root_can_write(real):
            found[real] = None
    return tuple(found)


def sandbox_paths(languages: tuple[object, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """
    What a sandbox running stdio handlers must grant: the real paths of the
    available interpreters and of the system program directories
    (L{program_paths}) to execute, and the interpreters' existing read
    paths.

    @return: C{(exec_paths, read_paths)} for
        L{haikutx.sandbox.SandboxPolicy}'s C{exec_paths} and
        C{extra_read_paths} (with C{allow_exec=True}).
    """
    import os

    executable: dict[str, None] = {}
    readable: dict[str, None] = {}
    for language in languages:
        if getattr(language, "runner", None) != "stdio" or not language.is_available():  # type: ignore[attr-defined]
            continue
        executable[os.path.realpath(language.interpreter())] = None  # type: ignore[attr-defined]
        for path in getattr(language, "read_paths", ()):
            if os.path.exists(path):
                readable[os.path.realpath(path)] = None
    if executable:
        for path in program_paths():
            executable[path] = None
    return tuple(executable), tuple(readable)
