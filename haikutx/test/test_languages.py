"""
Tests for L{haikutx.languages}: the plugins, their discovery and the
detection of a handler's language (SPEC §3.3).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from haikutx.interfaces import ILanguage
from haikutx.languages import (
    UnknownLanguage,
    by_name,
    detect,
    extension_of,
    find_languages,
    print_languages,
    shebang_program,
)
from haikutx.languages.builtin import BUILTIN, PythonLanguage, StdioLanguage

NAMES = {"python", "python3", "bash", "sh", "node", "ruby", "perl", "php", "lua", "tcl"}


class PluginTests(SynchronousTestCase):
    def test_verify_builtins(self) -> None:
        """
        Every built-in language provides L{ILanguage}.
        """
        for language in BUILTIN:
            self.assertTrue(verifyObject(ILanguage, language))
        self.assertEqual({language.name for language in BUILTIN}, NAMES)

    def test_discovered(self) -> None:
        """
        C{getPlugins} finds every built-in language in L{haikutx.plugins},
        Python first.
        """
        found = find_languages()
        self.assertEqual({language.name for language in found}, NAMES)
        self.assertEqual(found[0].name, "python")

    def test_third_party(self) -> None:
        """
        A module in C{haikutx/plugins/} of another C{sys.path} entry (no
        C{__init__.py}) adds a language.
        """
        root = Path(self.mktemp())
        plugins = root / "haikutx" / "plugins"
        plugins.mkdir(parents=True)
        (plugins / "thirdparty_cobol.py").write_text(
            "from haikutx.languages.builtin import StdioLanguage\n"
            "cobol = StdioLanguage('cobol', (), ('.cbl',), ('cobc',), ('cobc',),"
            " lambda p, c: [p, c])\n"
        )
        sys.path.append(str(root))
        self.addCleanup(sys.path.remove, str(root))
        import haikutx.plugins

        before = list(haikutx.plugins.__path__)
        haikutx.plugins.__path__.append(str(plugins))
        self.addCleanup(setattr, haikutx.plugins, "__path__", before)
        names = {language.name for language in find_languages()}
        self.assertEqual(names, NAMES | {"cobol"})

    def test_python_runs_in_worker(self) -> None:
        """
        Python is always available and has no command line; stdio languages
        name their interpreter in theirs.
        """
        python = PythonLanguage()
        self.assertTrue(python.is_available())
        self.assertIsNone(python.argv(b"res.end()"))
        bash = by_name(BUILTIN, "bash")
        argv = bash.argv(b"echo hi")
        self.assertEqual(argv[0], bash.interpreter())
        self.assertIn("echo hi", argv)

    def test_missing_interpreter(self) -> None:
        """
        A language whose interpreter is not installed is unavailable and
        refuses to build a command line.
        """
        ghost = StdioLanguage("ghost", (), (".gh",), ("ghost",), ("no-such-interp-xyz",),
                              lambda p, c: [p, c])
        self.assertFalse(ghost.is_available())
        self.assertIsNone(ghost.interpreter())
        self.assertRaises(ValueError, ghost.argv, b"x")

    def test_nul_refused(self) -> None:
        """
        Code with a NUL byte cannot be an argument: ValueError, not a crash.
        """
        self.assertRaises(ValueError, by_name(BUILTIN, "bash").argv, b"echo \0")

    def test_print_languages(self) -> None:
        """
        C{--languages} prints one line per language with its interpreter and
        whether it is available.
        """
        ghost = StdioLanguage("ghost", (), (".gh",), ("ghost",), ("no-such-interp-xyz",),
                              lambda p, c: [p, c])
        out = io.StringIO()
        print_languages(out, [PythonLanguage(), by_name(BUILTIN, "bash"), ghost])
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 4)
        self.assertTrue(lines[0].startswith("language"))
        self.assertIn(sys.executable, lines[1])
        self.assertTrue(lines[1].endswith(" available"))
        self.assertIn(by_name(BUILTIN, "bash").interpreter(), lines[2])
        self.assertIn("not installed", lines[3])
        self.assertTrue(lines[3].endswith("unavailable"))

    def test_print_all(self) -> None:
        """
        Without arguments every discovered language is listed.
        """
        out = io.StringIO()
        print_languages(out)
        listed = {line.split()[0] for line in out.getvalue().splitlines()[1:]}
        self.assertEqual(listed, NAMES)


_names = st.sampled_from(sorted(NAMES))
_stems = st.text(alphabet="abcdefghij-_", min_size=1, max_size=8)


class DetectionTests(SynchronousTestCase):
    @given(_names, st.sampled_from(["x.py", "x.js", "x", "http://h/a.rb?q=.php"]),
           st.binary(max_size=40))
    def test_override_wins(self, name: str, url: str, source: bytes) -> None:
        """
        C{x-haiku-language} wins over the extension and the C{#!} line, in
        any letter case.
        """
        self.assertEqual(detect(BUILTIN, name.upper(), url, source).name, name)

    @given(st.sampled_from([lang for lang in BUILTIN if lang.extensions]), _stems,
           st.booleans(), st.binary(max_size=40))
    def test_extension(self, language, stem: str, as_url: bool, source: bytes) -> None:
        """
        Without an override the extension of the URL's path (not its query)
        or of the local name decides, whatever the C{#!} line says.
        """
        extension = language.extensions[0]
        name = f"https://example.com/d/{stem}{extension}?x=.rb#.lua" if as_url else (
            f"sub/{stem}{extension.upper()}"
        )
        self.assertEqual(detect(BUILTIN, None, name, b"#!/usr/bin/perl\n" + source),
                         language)

    @given(st.sampled_from([lang for lang in BUILTIN if lang.interpreters]),
           st.sampled_from(["/usr/bin/{}", "/usr/bin/env {}", "/usr/bin/env -S {} -w",
                            "  /opt/x/bin/{}"]),
           st.binary(max_size=40))
    def test_shebang(self, language, form: str, rest: bytes) -> None:
        """
        A name without a known extension is detected from its C{#!} line.
        """
        line = ("#!" + form.format(language.interpreters[0])).encode()
        self.assertEqual(detect(BUILTIN, None, "handler", line + b"\n" + rest), language)

    @given(st.binary(max_size=60).filter(lambda b: not b.startswith(b"#!")), _stems)
    def test_default_python(self, source: bytes, stem: str) -> None:
        """
        Otherwise the handler is Python.
        """
        self.assertEqual(detect(BUILTIN, None, stem + ".txt", source).name, "python")

    def test_versioned_shebang(self) -> None:
        """
        C{#!/usr/bin/python3.11} names python3; an unknown program is Python.
        """
        self.assertEqual(detect(BUILTIN, None, "h", b"#!/usr/bin/python3.11\n").name,
                         "python3")
        self.assertEqual(detect(BUILTIN, None, "h", b"#!/usr/bin/awk -f\n").name, "python")

    @given(st.text(min_size=1, max_size=10).filter(
        lambda s: s.strip().lower() not in {a for lang in BUILTIN
                                             for a in (lang.name, *lang.aliases)}))
    def test_unknown_override(self, name: str) -> None:
        """
        An unknown C{x-haiku-language} is an error (the runtime answers 400).
        """
        self.assertRaises(UnknownLanguage, detect, BUILTIN, name, "x.py", b"")

    def test_helpers(self) -> None:
        self.assertEqual(extension_of("http://h/a/b.JS?x=1.py"), ".js")
        self.assertEqual(extension_of("dir.d/noext"), "")
        self.assertEqual(shebang_program(b"#!/usr/bin/env node\n"), "node")
        self.assertEqual(shebang_program(b"#! /bin/sh -e\n"), "sh")
        self.assertIsNone(shebang_program(b"# not a shebang"))
        self.assertIsNone(shebang_program(b"#!/usr/bin/env\n"))


class ProgramPathsTests(SynchronousTestCase):
    """
    L{program_paths}: the directories a stdio handler may execute from.
    """

    def test_only_root_writable(self) -> None:
        """
        A directory that another user or group could write, or beneath
        one, is left out; the real path of a system directory is kept.
        """
        import os

        from haikutx.languages.builtin import program_paths

        open_dir = Path(self.mktemp()).absolute()
        (open_dir / "bin").mkdir(parents=True)
        open_dir.chmod(0o777)
        self.addCleanup(open_dir.chmod, 0o755)
        found = program_paths((str(open_dir / "bin"), "/usr/bin", "/no/such/dir"))
        self.assertEqual(found, (os.path.realpath("/usr/bin"),)
                         if os.stat("/usr/bin").st_uid == 0 else ())
        self.assertEqual(program_paths(("/tmp",)), ())
