# -*- test-case-name: haikutx.test.test_names -*-
"""
The gate's names file, written for PicoLisp's httpGate and read unchanged.

One line per application, white-space separated::

    name port user dir log command...

Blank lines and lines whose first non-blank character is C{#} are ignored.
The token C{^} stands for an empty token. The name C{@} is the default
application, for paths that name no other. Port C{0} followed by exactly one
more token is a 301 redirect to that URL. A line of only C{name port} names
an application the gate forwards to but never starts.
"""

from __future__ import annotations

from attrs import field, frozen

#: The token that stands for an empty value.
EMPTY = "^"
#: The name of the default application.
DEFAULT = "@"


class NamesFileError(ValueError):
    """
    A names file does not parse.

    @ivar line: the 1-based number of the offending line.
    @ivar reason: what is wrong with it.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


@frozen
class NamesEntry:
    """
    One application of the names file.

    @ivar name: the first path segment that selects it (C{@}: the default).
    @ivar port: the local port it listens on (0 for a redirect).
    @ivar user: the user its command runs as (C{""}: the gate's own user).
    @ivar dir: its working directory (C{""}: the gate's).
    @ivar log: the file its stdout and stderr are appended to (C{""}: the
        gate's log).
    @ivar command: the command that starts it (empty: the gate never
        starts it).
    @ivar redirect: for port 0, the URL requests are redirected to.
    """

    name: str
    port: int
    user: str = ""
    dir: str = ""
    log: str = ""
    command: tuple[str, ...] = ()
    redirect: str | None = None

    def format(self) -> str:
        """
        This entry as one names-file line that parses back to it.
        """
        if self.redirect is not None:
            return f"{self.name} 0 {self.redirect}"
        if not self.command and not (self.user or self.dir or self.log):
            return f"{self.name} {self.port}"
        tokens = [self.user, self.dir, self.log, *self.command]
        return " ".join([self.name, str(self.port)] + [t or EMPTY for t in tokens])


def _token(value: str) -> str:
    return "" if value == EMPTY else value


def _parse_line(number: int, tokens: list[str]) -> NamesEntry:
    name, port_text = tokens[0], tokens[1] if len(tokens) > 1 else None
    if port_text is None:
        raise NamesFileError(number, f"{name!r} has no port")
    if name == EMPTY or "/" in name or name.isdigit():
        raise NamesFileError(
            number, f"{name!r} is not a usable name (empty, with '/' or all digits)"
        )
    if not port_text.isdigit():
        raise NamesFileError(number, f"port {port_text!r} of {name!r} is not a number")
    port = int(port_text)
    if port == 0:
        if len(tokens) != 3 or tokens[2] == EMPTY:
            raise NamesFileError(
                number, f"{name!r} has port 0 and needs exactly one redirect URL"
            )
        return NamesEntry(name=name, port=0, redirect=tokens[2])
    if not 1024 <= port <= 65535:
        raise NamesFileError(number, f"port {port} of {name!r} is not in 1024-65535")
    if len(tokens) == 2:
        return NamesEntry(name=name, port=port)
    if len(tokens) < 6:
        raise NamesFileError(
            number,
            f"{name!r} needs 'name port user dir log command...' "
            f"({len(tokens)} tokens given)",
        )
    command = tuple(_token(t) for t in tokens[5:])
    if not command[0]:
        raise NamesFileError(number, f"the command of {name!r} is empty")
    return NamesEntry(
        name=name,
        port=port,
        user=_token(tokens[2]),
        dir=_token(tokens[3]),
        log=_token(tokens[4]),
        command=command,
    )


@frozen
class NamesFile:
    """
    A parsed names file.

    @ivar entries: the applications, in file order.
    """

    entries: tuple[NamesEntry, ...] = ()
    _by_name: dict[str, NamesEntry] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {e.name: e for e in self.entries})

    @classmethod
    def parse(cls, text: str) -> NamesFile:
        """
        Parse the text of a names file.

        @param text: the file's contents.
        @return: the parsed file.
        @raise NamesFileError: for the first bad line, naming it.
        """
        entries: list[NamesEntry] = []
        seen: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            tokens = line.split()
            if not tokens or tokens[0].startswith("#"):
                continue
            entry = _parse_line(number, tokens)
            if entry.name in seen:
                raise NamesFileError(
                    number,
                    f"{entry.name!r} is already named on line {seen[entry.name]}",
                )
            seen[entry.name] = number
            entries.append(entry)
        return cls(tuple(entries))

    def format(self) -> str:
        """
        The text of this file, one line per entry; L{parse} reads it back
        to an equal L{NamesFile}.
        """
        return "".join(entry.format() + "\n" for entry in self.entries)

    def get(self, name: str) -> NamesEntry | None:
        """
        The entry called C{name}, or C{None}.
        """
        return self._by_name.get(name)

    @property
    def default(self) -> NamesEntry | None:
        """
        The default application (name C{@}), or C{None}.
        """
        return self._by_name.get(DEFAULT)
