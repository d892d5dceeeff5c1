"""
Tests for L{haikutx.child.zygote}'s own parsing of the server's orders.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from haikutx.child import wire
from haikutx.child.zygote_loop import retire_order as _retire_order


class RetireOrderTests(TestCase):
    """
    L{_retire_order} reads a C{RETIRE} frame's payload as JSON would.
    """

    def test_server_forms(self) -> None:
        """
        The two forms the server writes (L{wire.encode_json}) are read
        without the json module.
        """
        for order, expected in [
            ({"pid": 4242}, (4242, False)),
            ({"pid": 7, "report": True}, (7, True)),
            ({"pid": 7, "report": False}, (7, False)),
        ]:
            payload = wire.encode_json(wire.RETIRE, order)[5:]
            self.assertEqual(_retire_order(payload), expected)

    def test_other_json(self) -> None:
        """
        Any other JSON object with a pid is read as JSON.
        """
        self.assertEqual(_retire_order(b'{ "pid": 12, "report": 1 }'), (12, True))
        self.assertEqual(_retire_order(b'{"pid":12,"report":true,"x":1}'), (12, True))
        self.assertEqual(_retire_order(b'{"report":false,"pid":3}'), (3, False))

    def test_bad(self) -> None:
        """
        What is not an order with a pid raises what the zygote's reader
        catches (it then stops, as for any bad frame).
        """
        for payload in [b'{"pid":-1x}', b'{"pid":}', b"[]", b'{"pid":"a"}']:
            with self.assertRaises((ValueError, KeyError, TypeError)):
                _retire_order(payload)
        with self.assertRaises(KeyError):
            _retire_order(b'{"report":true}')
