# -*- test-case-name: haikutx.test.test_addresses -*-
"""
Tests for L{haikutx.net.addresses}.

The classifier is a pure function: these tests name special ranges only as
data to classify; nothing here opens a connection.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.net.addresses import (
    PUBLIC,
    AddressRules,
    EgressRules,
    URLPrefix,
    URLTarget,
    address_kind,
    ip_from_host,
    is_public,
)
from haikutx.test.strategies import loopback_hosts, non_public_hosts

ipv4 = st.integers(0, 2**32 - 1).map(IPv4Address)
loopback4 = st.integers(0x7F000000, 0x7FFFFFFF).map(IPv4Address)
path_text = st.text(alphabet="abcxyz/-_", max_size=12)


class AddressKindTests(SynchronousTestCase):
    """
    L{address_kind} and L{is_public}.
    """

    def test_loopback_forms(self) -> None:
        """
        Every loopback form a URL can name is classified as loopback.
        """
        for form in (
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "::ffff:0:7f00:1",
            "2002:7f00:1::1",
        ):
            self.assertEqual(address_kind(form), "loopback", form)
            self.assertFalse(is_public(form))

    def test_special_kinds(self) -> None:
        """
        Unspecified, metadata, link-local, unique-local and multicast
        addresses are named as such.
        """
        self.assertEqual(address_kind("0.0.0.0"), "unspecified")
        self.assertEqual(address_kind("::"), "unspecified")
        self.assertEqual(address_kind("169.254.169.254"), "metadata")
        self.assertEqual(address_kind("fd00:ec2::254"), "metadata")
        self.assertEqual(address_kind("::ffff:169.254.169.254"), "metadata")
        self.assertEqual(address_kind("169.254.1.1"), "link-local")
        self.assertEqual(address_kind("fe80::1%lo"), "link-local")
        self.assertEqual(address_kind("fd12::1"), "unique-local")
        self.assertEqual(address_kind("ff02::1"), "multicast")
        self.assertEqual(address_kind("224.0.0.1"), "multicast")
        self.assertEqual(address_kind("64:ff9b:1::1"), "NAT64 local-use")

    def test_not_an_address(self) -> None:
        """
        A name is not an address.
        """
        self.assertRaises(ValueError, address_kind, "localhost")

    @given(loopback4)
    def test_all_of_127_8(self, address: IPv4Address) -> None:
        """
        Every address in 127.0.0.0/8 is loopback.
        """
        self.assertEqual(address_kind(address), "loopback")

    @given(ipv4)
    def test_public_is_global(self, address: IPv4Address) -> None:
        """
        An address classified public is globally routable.
        """
        if is_public(address):
            self.assertTrue(address.is_global)

    @given(ipv4)
    def test_embedded_forms(self, address: IPv4Address) -> None:
        """
        IPv4-mapped, IPv4-translated and NAT64 forms classify as the
        IPv4 address they embed.
        """
        kind = address_kind(address)
        n = int(address)
        self.assertEqual(address_kind(IPv6Address(0xFFFF00000000 | n)), kind)
        self.assertEqual(address_kind(IPv6Address((0xFFFF << 48) | n)), kind)
        nat64 = int(IPv6Address("64:ff9b::")) | n
        self.assertEqual(address_kind(IPv6Address(nat64)), kind)

    @given(ipv4)
    def test_numeric_host_forms(self, address: IPv4Address) -> None:
        """
        Dotted, decimal and hexadecimal hosts denote the same address.
        """
        n = int(address)
        self.assertEqual(ip_from_host(str(address)), address)
        self.assertEqual(ip_from_host(str(n)), address)
        self.assertEqual(ip_from_host(hex(n)), address)

    def test_hosts(self) -> None:
        """
        L{ip_from_host} reads short and octal forms and leaves names alone.
        """
        self.assertEqual(ip_from_host("0x7f000001"), IPv4Address("127.0.0.1"))
        self.assertEqual(ip_from_host("127.1"), IPv4Address("127.0.0.1"))
        self.assertEqual(ip_from_host("0177.0.0.1"), IPv4Address("127.0.0.1"))
        self.assertEqual(ip_from_host("[::1]"), IPv6Address("::1"))
        self.assertIsNone(ip_from_host("localhost"))
        self.assertIsNone(ip_from_host("deadbeef.example"))


class AddressRulesTests(SynchronousTestCase):
    """
    L{AddressRules}: C{--allow} prefixes.
    """

    def test_no_prefixes(self) -> None:
        """
        Without prefixes every URL passes and only public addresses may be
        connected to.
        """
        rules = AddressRules()
        self.assertIsNone(rules.check_url("http", "localhost", 80, "/x"))
        reason = rules.check_address("http", "localhost", 80, "127.0.0.1")
        self.assertEqual(reason, "localhost resolves to a loopback address (127.0.0.1)")
        self.assertIsNotNone(rules.check_address("http", "0x7f000001", 80, "127.0.0.1"))
        self.assertIsNotNone(rules.check_address("https", "::1", 443, "::1"))

    def test_prefix_names_host(self) -> None:
        """
        A prefix naming a host allows that host's scheme and port, whatever
        its address; other hosts and ports stay refused.
        """
        rules = AddressRules.from_prefixes(["http://127.0.0.1:8000/handlers/"])
        self.assertIsNone(rules.check_url("http", "127.0.0.1", 8000, "/handlers/a.py"))
        self.assertEqual(
            rules.check_url("http", "127.0.0.1", 8000, "/other"),
            "it matches no --allow prefix",
        )
        self.assertIsNotNone(rules.check_url("https", "127.0.0.1", 8000, "/handlers/"))
        self.assertIsNotNone(rules.check_url("http", "127.0.0.1", 8001, "/handlers/"))
        self.assertEqual(
            rules.check_url("http", "127.0.0.1", 8000, "/handlers/../admin"),
            "its path has dot segments",
        )
        self.assertIsNotNone(
            rules.check_url("http", "127.0.0.1", 8000, "/handlers/%2e%2e/admin")
        )
        self.assertIsNone(rules.check_address("http", "127.0.0.1", 8000, "127.0.0.1"))
        self.assertIsNotNone(
            rules.check_address("http", "localhost", 8000, "127.0.0.1")
        )
        self.assertIsNotNone(
            rules.check_address("http", "127.0.0.1", 8001, "127.0.0.1")
        )

    def test_scheme_only_prefix(self) -> None:
        """
        A scheme-only prefix allows any https URL but no private address.
        """
        rules = AddressRules.from_prefixes(["https://"])
        self.assertIsNone(rules.check_url("https", "localhost", 443, "/"))
        self.assertIsNotNone(rules.check_url("http", "localhost", 80, "/"))
        self.assertIsNotNone(rules.check_address("https", "localhost", 443, "::1"))

    def test_bad_prefix(self) -> None:
        """
        A prefix of another scheme does not parse.
        """
        self.assertRaises(ValueError, URLPrefix.parse, "ftp://localhost/")

    @given(path_text, path_text)
    def test_path_prefix(self, prefix: str, path: str) -> None:
        """
        A URL matches a prefix naming its host exactly when its path starts
        with the prefix's path.
        """
        rules = AddressRules.from_prefixes([f"http://localhost:81/{prefix}"])
        target = "/" + path
        allowed = rules.check_url("http", "localhost", 81, target) is None
        dots = any(s in (".", "..") for s in target.split("/"))
        self.assertEqual(allowed, target.startswith("/" + prefix) and not dots)


class EgressRulesTests(SynchronousTestCase):
    """
    L{EgressRules}: C{host:port} pairs a handler may reach although private.
    """

    def test_public_needs_no_pair(self) -> None:
        """
        Without pairs, loopback is refused with its kind named.
        """
        rules = EgressRules()
        self.assertEqual(
            rules.check("localhost", 5432, "127.0.0.1"),
            "localhost:5432 resolves to a loopback address (127.0.0.1)",
        )

    def test_pairs(self) -> None:
        """
        A listed pair allows its host (by name or address) on its port only.
        """
        rules = EgressRules.from_pairs(["127.0.0.1:5432", "localhost:6379"])
        self.assertIsNone(rules.check("localhost", 5432, "127.0.0.1"))
        self.assertIsNone(rules.check("127.0.0.1", 5432, "::ffff:127.0.0.1"))
        self.assertIsNone(rules.check("localhost", 6379, "::1"))
        self.assertIsNotNone(rules.check("localhost", 5433, "127.0.0.1"))
        self.assertIsNotNone(rules.check("127.0.0.2", 5432, "127.0.0.2"))
        self.assertRaises(ValueError, EgressRules.from_pairs, ["localhost"])

    @given(loopback4, st.integers(1, 65535))
    def test_unlisted_loopback_refused(self, address: IPv4Address, port: int) -> None:
        """
        Any loopback address on any port is refused unless listed.
        """
        rules = EgressRules.from_pairs(["localhost:1"])
        reason = rules.check(str(address), port, address)
        self.assertEqual(reason is None, False)
        self.assertNotEqual(address_kind(address), PUBLIC)


class SpellingTests(SynchronousTestCase):
    """
    Every spelling of an address that is not public is read as that address
    and refused, by the one classifier every product uses.
    """

    @given(non_public_hosts())
    def test_non_public_spellings(self, case) -> None:
        """
        Dotted, decimal, hex, octal and short IPv4, and its IPv4-mapped,
        IPv4-compatible, IPv4-translated, NAT64 and 6to4 forms, all denote a
        non-public address, and a URL naming it is refused without a
        prefix.
        """
        host, address = case
        parsed = ip_from_host(host)
        self.assertIsNotNone(parsed, host)
        self.assertNotEqual(address_kind(parsed), PUBLIC, host)
        target = URLTarget.parse(f"http://{host}:8080/cb")
        self.assertIsNotNone(AddressRules().check_target(target), host)

    @given(loopback_hosts)
    def test_loopback_spellings(self, host) -> None:
        """
        Each loopback spelling is classified C{loopback}, refused by default
        and allowed by a prefix naming that very host and port.
        """
        self.assertEqual(address_kind(ip_from_host(host)), "loopback", host)
        url = f"http://{host}:8080/cb"
        target = URLTarget.parse(url)
        self.assertIn("loopback", AddressRules().check_target(target))
        allowed = AddressRules.from_prefixes([f"http://{host}:8080/"])
        self.assertIsNone(allowed.check_target(target), host)

    def test_ipv4_compatible(self) -> None:
        """
        The deprecated IPv4-compatible form is never public, and is named
        for what it embeds when that is not public.
        """
        self.assertEqual(address_kind("::7f00:1"), "loopback")
        self.assertEqual(address_kind("::a9fe:a9fe"), "metadata")
        self.assertEqual(address_kind("::8.8.8.8"), "IPv4-compatible (deprecated)")


class URLTargetTests(SynchronousTestCase):
    """
    L{URLTarget.parse} splits http(s) URLs the way the rules read them.
    """

    def test_parts(self) -> None:
        """
        Scheme, lower-case host without brackets, default port and target.
        """
        self.assertEqual(
            URLTarget.parse("https://[::1]/a?b=1"),
            URLTarget("https://[::1]/a?b=1", "https", "::1", 443, "/a?b=1"),
        )
        self.assertEqual(URLTarget.parse("http://Example.COM:81").target, "/")

    def test_refused(self) -> None:
        """
        Other schemes, credentials, bad ports, white space, backslashes,
        percent signs in the host and non-ASCII are refused.
        """
        for url in (
            "ftp://example.com/",
            "http://u:p@example.com/",
            "http://example.com:99999/",
            "http://exa mple.com/",
            "http://example.com\\@127.0.0.1/",
            "http://%31%32%37.0.0.1/",
            "http://ex\u00e4mple.com/",
            "http:///x",
        ):
            self.assertRaises(ValueError, URLTarget.parse, url)
