# -*- test-case-name: haikutx.test.test_languages -*-
"""
Handler languages (SPEC §3.3): discovery of L{ILanguage} plugins and the
detection of a handler's language.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import urlsplit

from haikutx.interfaces import ILanguage


class UnknownLanguage(ValueError):
    """
    C{x-haiku-language} names no known language.
    """


def find_languages() -> tuple[Any, ...]:
    """
    Every L{ILanguage} plugin in L{haikutx.plugins}, built-ins first; a name
    given twice keeps the first.
    """
    from twisted.plugin import getPlugins

    import haikutx.plugins

    found: dict[str, Any] = {}
    for language in getPlugins(ILanguage, haikutx.plugins):
        found.setdefault(language.name, language)
    builtin = [n for n in ("python",) if n in found]
    return tuple(found[n] for n in builtin) + tuple(
        v for k, v in sorted(found.items()) if k not in builtin
    )


def by_name(languages: Iterable[Any], name: str) -> Any:
    """
    The language called C{name} (case-insensitive), or one of its aliases.

    @raise UnknownLanguage: when there is none.
    """
    wanted = name.strip().lower()
    for language in languages:
        if wanted == language.name or wanted in language.aliases:
            return language
    raise UnknownLanguage(name)


def extension_of(name: str) -> str:
    """
    The file extension (lower-case, with the dot) of a handler URL or local
    name, ignoring its query and fragment; C{""} when there is none.
    """
    try:
        path = urlsplit(name).path
    except ValueError:
        path = name
    return posixpath.splitext(posixpath.basename(path))[1].lower()


_SHEBANG = re.compile(rb"#![ \t]*(\S+)([^\r\n]*)")


def shebang_program(source: bytes) -> str | None:
    """
    The program a C{#!} first line names (C{/usr/bin/env node} names
    C{node}), or C{None}.
    """
    match = _SHEBANG.match(source)
    if match is None:
        return None
    program = posixpath.basename(match.group(1).decode("utf-8", "replace"))
    if program == "env":
        for word in match.group(2).decode("utf-8", "replace").split():
            if not word.startswith("-") and "=" not in word:
                return posixpath.basename(word)
        return None
    return program


def detect(languages: Iterable[Any], override: str | None, name: str, source: bytes) -> Any:
    """
    A handler's language, in SPEC §3.3's order: C{x-haiku-language}, the
    file extension of its URL or name, its C{#!} line, else Python.

    @param languages: the known languages; one is named C{python}.
    @param override: the C{x-haiku-language} value, or C{None}.
    @param name: the handler's URL or local name.
    @param source: the handler's code.
    @raise UnknownLanguage: when C{override} names no language.
    """
    languages = tuple(languages)
    if override:
        return by_name(languages, override)
    extension = extension_of(name)
    if extension:
        for language in languages:
            if extension in language.extensions:
                return language
    program = shebang_program(source)
    if program:
        # python3.11 names python3, ruby3.1 ruby
        for candidate in (program, re.sub(r"\.[0-9.]*\Z", "", program),
                          program.rstrip("0123456789.")):
            for language in languages:
                if candidate and candidate in language.interpreters:
                    return language
    return by_name(languages, "python")


def print_languages(out: TextIO | None = None, languages: Iterable[Any] | None = None) -> None:
    """
    Print each language, its other names, extensions, interpreter and
    whether it is available here (C{twistd haiku --languages}).
    """
    out = out or sys.stdout
    rows = []
    for language in find_languages() if languages is None else languages:
        available = language.is_available()
        rows.append(
            (
                language.name,
                ", ".join(language.aliases) or "-",
                " ".join(language.extensions) or "-",
                language.interpreter() or "not installed",
                "available" if available else "unavailable",
            )
        )
    header = ("language", "aliases", "extensions", "interpreter", "status")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        cells = [row[i].ljust(widths[i]) for i in range(4)] + [row[4]]
        out.write("  ".join(cells).rstrip() + "\n")
