"""
Tests for L{haikutx.gate.names}.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.gate.names import NamesEntry, NamesFile, NamesFileError
from haikutx.test.strategies import ignored_lines, names_entries, names_files


class NamesFileParseTests(SynchronousTestCase):
    """
    L{NamesFile.parse} reads httpGate's names file.
    """

    def test_example(self) -> None:
        """
        A file as httpGate's documentation shows it parses to its entries:
        C{^} is empty, C{@} the default, port 0 a redirect.
        """
        text = (
            "# comment\n"
            "\n"
            "app 8080 www /srv/app ^ python3 -m http.server 8080\n"
            "@ 8081 ^ /srv ^ ./run ^ x\n"
            "old 0 https://example.invalid/new\n"
            "plain 9000\n"
        )
        names = NamesFile.parse(text)
        self.assertEqual(
            names.entries,
            (
                NamesEntry("app", 8080, "www", "/srv/app", "",
                           ("python3", "-m", "http.server", "8080")),
                NamesEntry("@", 8081, "", "/srv", "", ("./run", "", "x")),
                NamesEntry("old", 0, redirect="https://example.invalid/new"),
                NamesEntry("plain", 9000),
            ),
        )
        self.assertEqual(names.default, names.entries[1])
        self.assertEqual(names.get("old").redirect, "https://example.invalid/new")
        self.assertIsNone(names.get("missing"))

    @given(names_files())
    def test_round_trip(self, names: NamesFile) -> None:
        """
        L{NamesFile.format} writes text that parses back to an equal file.
        """
        self.assertEqual(NamesFile.parse(names.format()), names)

    @given(names_files(), st.data())
    def test_ignored_lines(self, names: NamesFile, data) -> None:
        """
        Blank lines and comments anywhere, and any spacing between tokens,
        change nothing.
        """
        lines = []
        for entry in names.entries:
            lines.extend(data.draw(st.lists(ignored_lines, max_size=2)))
            sep = data.draw(st.sampled_from([" ", "\t", "  \t "]))
            lines.append(sep.join(entry.format().split(" ")) + sep)
        lines.extend(data.draw(st.lists(ignored_lines, max_size=2)))
        self.assertEqual(NamesFile.parse("\n".join(lines)), names)

    @given(names_entries(), st.integers(0, 5))
    def test_error_names_line(self, entry: NamesEntry, blanks: int) -> None:
        """
        A bad line is reported by its number, after any number of good or
        ignored lines.
        """
        text = entry.format() + "\n" + "#\n" * blanks + "bad notaport x y z cmd\n"
        with self.assertRaises(NamesFileError) as caught:
            NamesFile.parse(text)
        self.assertEqual(caught.exception.line, blanks + 2)
        self.assertIn(f"line {blanks + 2}:", str(caught.exception))

    def test_errors(self) -> None:
        """
        Each kind of bad line gets its own clear reason.
        """
        cases = {
            "app": "has no port",
            "app 80": "not in 1024-65535",
            "app 70000": "not in 1024-65535",
            "app x": "is not a number",
            "app 0": "needs exactly one redirect URL",
            "app 0 a b": "needs exactly one redirect URL",
            "app 8080 u d": "needs 'name port user dir log command...'",
            "app 8080 u d l ^": "the command of 'app' is empty",
            "8080 8080": "not a usable name",
            "a/b 8080": "not a usable name",
            "^ 8080": "not a usable name",
            "app 8080\napp 8081": "already named on line 1",
        }
        for text, reason in cases.items():
            with self.assertRaises(NamesFileError, msg=text) as caught:
                NamesFile.parse(text)
            self.assertIn(reason, caught.exception.reason, text)
