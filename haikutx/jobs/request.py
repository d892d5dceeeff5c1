# -*- test-case-name: haikutx.test.test_jobs -*-
"""
A job request: the body of a C{POST /}, read into a command, its arguments
and its callback (L{parse_job_request}), and the rules a job must meet to
be accepted (L{check_job}).
"""

from __future__ import annotations

import json
from collections.abc import Collection

from haikutx.jobs.callbacks import CallbackRefused, check_callback_url
from haikutx.net.addresses import AddressRules

#: Largest request body the API reads, in bytes (larger gets 413).
MAX_REQUEST_BODY = 64 * 1024


class JobRefused(Exception):
    """
    A job request the runner will not accept; the message says why and is
    given to the client in a 400.
    """


def check_job(
    whitelist: Collection[str] | None,
    rules: AddressRules,
    command: str,
    arguments: list[str],
    callback: str | None,
) -> None:
    """
    Refuse a job the runner may not accept.

    @param whitelist: the only commands allowed, or C{None} for all.
    @param rules: the address rules callbacks obey (C{--allow}).
    @raise JobRefused: for a command outside the whitelist, a bad
        callback URL, or NUL characters.
    """
    if whitelist is not None and command not in whitelist:
        raise JobRefused("Specified command is not in whitelist.")
    if "\0" in command or any("\0" in a for a in arguments):
        raise JobRefused("command and args must not contain NUL characters")
    if callback is not None:
        try:
            check_callback_url(callback, rules)
        except CallbackRefused as e:
            raise JobRefused(str(e)) from None


def split_args(args: object) -> list[str]:
    """
    The argument list of a job request's C{args}.

    @param args: a string (split on runs of white space, with no empty
        arguments at the ends, unlike http-runner), a list of strings (taken
        as is, so arguments with spaces work) or C{None} (no arguments).
    @return: the arguments.
    @raise JobRefused: for anything else.
    """
    if args is None:
        return []
    if isinstance(args, str):
        return args.split()
    if isinstance(args, list) and all(isinstance(a, str) for a in args):
        return list(args)
    raise JobRefused("args must be a string or a list of strings")


def parse_job_request(body: bytes) -> tuple[str, list[str], str | None]:
    """
    The command, arguments and callback of a C{POST /} body.

    @raise JobRefused: when it is not a JSON object with a string
        C{command}, or C{args}/C{callback} have the wrong types.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobRefused("the request body is not UTF-8") from None
    except ValueError as e:
        raise JobRefused(f"invalid JSON: {e}") from None
    if not isinstance(request, dict):
        raise JobRefused("the request body must be a JSON object")
    command = request.get("command")
    if command is None:
        raise JobRefused("command is missing")
    if not isinstance(command, str) or not command:
        raise JobRefused("command must be a non-empty string")
    arguments = split_args(request.get("args"))
    callback = request.get("callback")
    if callback is not None and not isinstance(callback, str):
        raise JobRefused("callback must be a string")
    return command, arguments, callback or None
