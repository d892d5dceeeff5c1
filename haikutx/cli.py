# -*- test-case-name: haikutx.test.test_cli -*-
"""
The C{haiku} command: C{haiku ARGS} runs C{twistd -n --pidfile= haiku ARGS},
in the foreground and without a pidfile, so that several servers run side
by side from one directory as stackvana's C{stack ./file} does
(C{haiku --serve ./echo.rb} twice: two servers, on 3000 and 3001).
C{twistd haiku} stays the way to run as a daemon, with a pidfile.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """
    Run C{twistd -n --pidfile= haiku} with C{argv} (default: this process's
    arguments).

    @param argv: the options of the C{haiku} plugin.
    """
    from twisted.python.usage import UsageError
    from twisted.scripts.twistd import ServerOptions, runApp

    if argv is None:
        argv = sys.argv[1:]
    config = ServerOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", "haiku", *argv])
    except UsageError as e:
        # twistd prints its whole help first; one line says it all.
        sys.stderr.write(f"haiku: {e}\n")
        raise SystemExit(1) from None
    runApp(config)


if __name__ == "__main__":  # pragma: no cover
    main()
