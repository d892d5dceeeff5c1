"""
The process is the trust boundary (SPEC 3.2): hostile handlers written by
an attacker who knows haikutx's code attack the runtime's own objects and
descriptors, not only the kernel, and a later request of another tenant
must see nothing of them.

Each attack runs in a real runtime with one worker slot and
C{--maxrequests 1}, so that on the old design every later request would
have gone to the attacker's process or to a sibling forked from the same
zygote.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SkipTest, TestCase

from haikutx.sandbox import probe
from haikutx.test.support import http, ready, start_runtime, until

#: Keeps its process: finds the runtime's worker in its own heap, stops it
#: from ever stopping, takes over its request handling, and tells the
#: server it is a fresh process, on every descriptor it holds.
#: Finds the runtime's worker objects: in the collector's lists and up the
#: stack that runs the handler (the zygote makes a child's worker before
#: forking and freezes it, so the collector's lists need not hold it).
FIND_WORKERS = r"""
import gc, sys
def _is_worker(o):
    return type(o).__name__ == 'Worker' and hasattr(o, '_frame')
workers = [o for o in gc.get_objects() if _is_worker(o)]
_f = sys._getframe()
while _f is not None:
    _o = _f.f_locals.get('self')
    if _is_worker(_o) and not any(w is _o for w in workers):
        workers.append(_o)
    _f = _f.f_back
"""

KEEP = FIND_WORKERS + r"""
import json, os
from haikutx.child import wire
me = os.getpid()
for worker in workers:
    worker.max_requests = 0
    worker.loop.stop = lambda: None          # never leave the loop
    def steal(head, body, worker=worker):
        worker.send(wire.encode_json(wire.HEAD, {'status': 200, 'headers': []}))
        worker.send(wire.encode(wire.DATA, ('pwned by %d: %s' % (
            me, json.dumps(head.get('headers')))).encode()))
        worker.send(wire.encode_json(wire.FINISH, {'trailers': []}))
    worker._start = steal
res.end('attacker %d found %d workers' % (me, len(workers)))
ready = wire.encode_json(wire.READY, {'pid': me})
for worker in workers:
    try:
        worker.send(ready)
    except OSError:
        pass
for fd in range(64):
    try:
        os.write(fd, ready)
    except OSError:
        pass
"""

#: Forges every frame kind the wire format has (the zygote's included),
#: with every field a payload may have, on every descriptor it holds,
#: before and after its own response.
FORGE = r"""
import os
from haikutx.child import wire
me = os.getpid()
kinds = [getattr(wire, n) for n in dir(wire) if n.isupper()
         and isinstance(getattr(wire, n), int) and n not in ('MAX_FRAME', 'CHUNK')]
forged = b''.join(
    wire.encode_json(kind, {'pid': me, 'code': 0, 'signal': None, 'retired': False,
                            'status': 200, 'headers': [], 'trailers': [],
                            'layers': {}})
    for kind in kinds) + wire.encode(wire.OUTPUT, me.to_bytes(4, 'big') + b'forged')
def forge():
    for fd in range(64):
        try:
            os.write(fd, forged)
        except OSError:
            pass
if req.query.get('when') == 'before':
    forge()
res.end('forger %d' % me)
forge()
"""

#: Holds on: keeps its loop from stopping when its channel closes and waits.
LINGER = FIND_WORKERS + r"""
import asyncio, os
for o in workers:
    o.loop.stop = lambda: None
    o.loop.remove_reader(o._in)      # never notice the channel closing
res.write_head(200, {'x-pid': str(os.getpid())})
res.write('lingering')
await asyncio.sleep(60)
"""

#: Another tenant: answers with its pid and what it was sent.
VICTIM = r"""
import os
res.end('victim %d %s' % (os.getpid(), req.headers.get('authorization')))
"""

#: Tries to widen the Landlock domain of later children: adds a rule
#: granting everything beneath / to every descriptor it holds, and tries
#: restrict_self and create_ruleset.
LANDLOCK = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [('allowed_access', ctypes.c_uint64), ('parent_fd', ctypes.c_int32)]
try:
    root = os.open('/', os.O_PATH)
except OSError as e:
    root = -1
attr = PathBeneath((1 << 16) - 1, root)
results = {}
for fd in range(256):
    try:
        os.fstat(fd)
    except OSError:
        continue
    added = libc.syscall(445, ctypes.c_int(fd), ctypes.c_int(1), ctypes.byref(attr),
                         ctypes.c_uint32(0))
    err = ctypes.get_errno()
    restricted = libc.syscall(446, ctypes.c_int(fd), ctypes.c_uint32(0))
    results[fd] = [added, err if added < 0 else 0, restricted]
res.end(json.dumps(results))
"""

#: Reads what must stay unreadable.
READER = r"""
import json
out = {}
for path in req.query['paths'].split(','):
    try:
        with open(path, 'rb') as f:
            out[path] = 'read: ' + f.read(20).decode('latin-1')
    except OSError as e:
        out[path] = type(e).__name__
res.end(json.dumps(out))
"""

#: Reports its pid, then waits (so its descriptors can be looked at from
#: outside), after listing what it holds as seen from inside.
HOLD = r"""
import asyncio, json, os, stat
held = {}
for fd in range(1024):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        continue
    held[fd] = stat.S_IFMT(mode)
console.log(json.dumps({'pid': os.getpid(), 'held': held}))
res.write_head(200, {'x-pid': str(os.getpid())})
res.write(json.dumps(held))
await asyncio.sleep(float(req.query.get('wait', '2')))
res.end()
"""

#: Probes every process up to a little beyond its own pid with signal 0
#: (C{kill} and C{pidfd_send_signal}): which ones it could signal; then
#: sends SIGKILL both ways to the pids named in its query (its zygote and
#: the zygote's forker: only those, should the sandbox fail).
SIGNAL_ALL = r"""
import ctypes, json, os, signal
me = os.getpid()
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def pidfd_signal(pid, number):
    fd = libc.syscall(434, ctypes.c_int(pid), ctypes.c_uint(0))  # pidfd_open
    if fd < 0:
        return False
    try:
        return libc.syscall(424, ctypes.c_int(fd), ctypes.c_int(number), None,
                            ctypes.c_uint(0)) == 0  # pidfd_send_signal
    finally:
        os.close(fd)
reachable = []
for pid in range(1, me + 200):
    if pid == me:
        continue
    try:
        os.kill(pid, 0)
        reachable.append(pid)
    except OSError:
        if pidfd_signal(pid, 0):
            reachable.append(pid)
killed = []
for pid in [int(p) for p in req.query['kill'].split(',')]:
    try:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    except OSError:
        pass
    if pidfd_signal(pid, signal.SIGKILL):
        killed.append(pid)
res.end(json.dumps({'reachable': reachable, 'killed': killed}))
"""

#: Reports its process's identity: ids, supplementary groups, the
#: keep-capabilities flag, and whether it can get root back.
IDENTITY = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    os.setresuid(0, 0, 0)
    regained = True
except OSError:
    regained = False
res.end(json.dumps({'uids': os.getresuid(), 'gids': os.getresgid(),
                    'groups': os.getgroups(), 'keep_caps': libc.prctl(7, 0, 0, 0, 0),
                    'root': regained}))
"""

#: System V and POSIX IPC, both families: write (do=put) or read (do=get)
#: under a fixed key, and the /dev/shm and /dev/mqueue file systems.
IPC = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
for name in ('shmat', 'mq_open'):
    getattr(libc, name).restype = ctypes.c_void_p if name == 'shmat' else ctypes.c_int
KEY = 0x4841494b
IPC_CREAT, IPC_NOWAIT = 0o1000, 0o4000
put = req.query['do'] == 'put'
secret = (req.query.get('secret') or '').encode()
out = {}
def call(name, *args):
    r = getattr(libc, name)(*args)
    return r, ctypes.get_errno()
# SysV shared memory
shm, e = call('shmget', KEY, 4096, (IPC_CREAT | 0o666) if put else 0)
out['shmget'] = shm if shm >= 0 else errno.errorcode.get(e, e)
if shm >= 0:
    addr = libc.shmat(shm, None, 0)
    if addr not in (None, ctypes.c_void_p(-1).value):
        if put:
            ctypes.memmove(addr, secret, len(secret))
        else:
            out['shm_data'] = ctypes.string_at(addr, 16).rstrip(b'\0').decode('latin-1')
# SysV message queue
class Msg(ctypes.Structure):
    _fields_ = [('mtype', ctypes.c_long), ('mtext', ctypes.c_char * 64)]
q, e = call('msgget', KEY, (IPC_CREAT | 0o666) if put else 0)
out['msgget'] = q if q >= 0 else errno.errorcode.get(e, e)
if q >= 0:
    m = Msg(1, secret)
    if put:
        out['msgsnd'] = call('msgsnd', q, ctypes.byref(m), len(secret), IPC_NOWAIT)[0]
    else:
        n, e = call('msgrcv', q, ctypes.byref(m), 64, 0, IPC_NOWAIT)
        out['msg_data'] = m.mtext.decode('latin-1') if n > 0 else errno.errorcode.get(e, e)
# SysV semaphores
s, e = call('semget', KEY, 1, (IPC_CREAT | 0o666) if put else 0)
out['semget'] = s if s >= 0 else errno.errorcode.get(e, e)
# POSIX message queue
flags = (os.O_CREAT | os.O_RDWR) if put else os.O_RDONLY
mq, e = call('mq_open', b'/haikutx-test', flags, 0o666, None)
out['mq_open'] = mq if mq >= 0 else errno.errorcode.get(e, e)
# POSIX shared memory and the IPC file systems
for path in ('/dev/shm/haikutx-test', '/dev/mqueue/haikutx-test'):
    try:
        if put:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
            os.write(fd, secret)
        else:
            fd = os.open(path, os.O_RDONLY)
            out[path + ':data'] = os.read(fd, 64).decode('latin-1')
        os.close(fd)
        out[path] = 'open'
    except OSError as e:
        out[path] = type(e).__name__
try:
    out['/dev/shm:list'] = os.listdir('/dev/shm')
except OSError as e:
    out['/dev/shm:list'] = type(e).__name__
res.end(json.dumps(out))
"""

_KEY = 0x4841494B


def _remove_sysv_objects() -> None:
    """
    Remove System V objects under the attack's key, should an unconfined
    runtime have let a handler create them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    IPC_RMID = 0
    for get, ctl in (("shmget", "shmctl"), ("msgget", "msgctl"), ("semget", "semctl")):
        args = (_KEY, 0, 0) if get != "semget" else (_KEY, 0, 0)
        ident = getattr(libc, get)(*args)
        if ident >= 0:
            if ctl == "semctl":
                libc.semctl(ident, 0, IPC_RMID)
            else:
                getattr(libc, ctl)(ident, IPC_RMID, None)
    for path in ("/dev/shm/haikutx-test",):
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        libc.mq_unlink(b"/haikutx-test")
    except AttributeError:
        pass


def _needs_full_sandbox() -> None:
    if os.geteuid() != 0:
        raise SkipTest("the uid switch and namespaces need root")
    layers = probe()
    if layers.landlock_abi < 6 or not layers.seccomp:
        raise SkipTest(f"this kernel lacks a sandbox layer: {layers.reasons}")


class IsolationTests(TestCase):
    """
    Attacks on the runtime itself, each followed by another tenant's
    request.
    """

    def setUp(self) -> Deferred[None]:
        _needs_full_sandbox()
        self.addCleanup(_remove_sysv_objects)
        self.secret = Path(self.mktemp()).absolute()
        self.secret.mkdir()
        (self.secret / "key.pem").write_text("PRIVATE KEY")
        self.port, self.pool = start_runtime(
            self,
            {
                "keep.py": KEEP,
                "forge.py": FORGE,
                "linger.py": LINGER,
                "victim.py": VICTIM,
                "landlock.py": LANDLOCK,
                "reader.py": READER,
                "hold.py": HOLD,
                "identity.py": IDENTITY,
                "signal-all.py": SIGNAL_ALL,
                "ipc.py": IPC,
            },
            workers=1,
            max_requests=1,
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def victim(self, token: str) -> tuple[int, str]:
        """
        Another tenant's request with a secret header; its pid and text.
        """
        response = await http(
            self.port, "/?x-haiku-handler=victim.py", headers={"Authorization": token}
        )
        self.assertEqual(response.status, 200, response.text)
        self.assertNotIn("pwned", response.text)
        word, pid, seen = response.text.split(" ", 2)
        self.assertEqual((word, seen), ("victim", token))
        return int(pid), response.text

    async def test_keep_process(self) -> None:
        """
        A handler that takes over the runtime's worker object in its heap,
        keeps its loop from stopping and forges every frame kind (an old
        READY included) on every descriptor it holds does not get a later
        request: each one is served by a process that served no other, and
        the attacker's process is gone.
        """
        response = await http(self.port, "/?x-haiku-handler=keep.py")
        self.assertEqual(response.status, 200, response.text)
        words = response.text.split()
        attacker = int(words[1])
        self.assertNotEqual(words[3], "0", "the attack found no worker object to abuse")
        pids = {attacker}
        for i in range(5):
            pid, _ = await self.victim(f"secret-{i}")
            self.assertNotIn(pid, pids)
            pids.add(pid)

        def gone() -> bool:
            try:
                os.kill(attacker, 0)
            except ProcessLookupError:
                return True
            return False

        await until(gone, 5, lambda: f"the attacker's process {attacker} still runs")

    async def test_nothing_outlives_its_zygote(self) -> None:
        """
        When a zygote dies (here: killed), its child dies too, even one that
        stopped reading its channel, and so do its egress relay and its
        forker: no process of the slot is left running.
        """
        pending = Deferred.fromCoroutine(http(self.port, "/?x-haiku-handler=linger.py"))
        await until(lambda: self.pool.status()["workers"].get("busy") == 1, 10)
        worker = next(iter(self.pool.workers))
        zygote = worker.pid
        await until(lambda: _answering(worker), 5, lambda: "the handler did not start")
        mine = [pid for pid in _all_pids() if _parent(pid) == zygote]
        # The child, the egress relay and the forker.
        self.assertEqual(len(mine), 3, mine)
        os.kill(zygote, 9)
        await pending

        await until(lambda: not any(_alive(pid) for pid in mine), 10,
                    lambda: f"left behind: {[p for p in mine if _alive(p)]}")

    async def test_relay_holds_no_worker(self) -> None:
        """
        A slot's egress relay is forked before its zygote imports what
        children need (their worker, asyncio): the relay has not loaded
        asyncio's C module, which its zygote has.
        """
        await self.victim("warm")
        worker = next(iter(self.pool.workers))
        zygote = worker.pid
        await until(lambda: worker.child_pid is not None, 5, lambda: "no next child")

        def loaded(pid: int) -> bool:
            with open(f"/proc/{pid}/maps") as maps:
                return "_asyncio." in maps.read()

        mine = [pid for pid in _all_pids() if _parent(pid) == zygote]
        relays = [
            pid for pid in mine
            if pid != worker.child_pid and _comm(pid) != "haiku-forker"
        ]
        self.assertEqual(len(relays), 1, (mine, worker.child_pid))
        self.assertTrue(loaded(zygote), "the zygote has not loaded _asyncio")
        self.assertFalse(loaded(relays[0]), "the egress relay holds the children's imports")

    async def test_forge_every_frame(self) -> None:
        """
        Every frame kind forged on every descriptor, before or after the
        handler's own response, changes nothing for later requests: each is
        served by a fresh process, answers what its own handler says, and
        the slot keeps serving.
        """
        pids = set()
        for when in ("before", "after", "before", "after"):
            response = await http(self.port, f"/?x-haiku-handler=forge.py&when={when}")
            if response.status == 200:
                self.assertTrue(response.text.startswith("forger "), response.text)
                pids.add(int(response.text.split()[1]))
            else:
                # Forged before its response: the child's own request fails.
                self.assertEqual(response.status, 500, response.text)
            pid, _ = await self.victim(f"after-{when}")
            self.assertNotIn(pid, pids)
            pids.add(pid)
        self.assertEqual(self.pool.counters["started"], 1)

    async def test_landlock_not_widened(self) -> None:
        """
        A handler that adds a rule granting everything beneath / to every
        descriptor it holds (and tries restrict_self on each) widens no
        later handler's domain: no descriptor it holds is a ruleset, and
        the next handlers still cannot read /etc/shadow or a TLS key, nor
        list /root.
        """
        response = await http(self.port, "/?x-haiku-handler=landlock.py")
        self.assertEqual(response.status, 200, response.text)
        results = json.loads(response.body)
        self.assertTrue(results, "the handler holds no descriptor at all")
        targets = ",".join(["/etc/shadow", str(self.secret / "key.pem"), "/root/.bashrc"])
        for _ in range(3):
            read = await http(self.port, f"/?x-haiku-handler=reader.py&paths={targets}")
            self.assertEqual(read.status, 200, read.text)
            self.assertEqual(
                set(json.loads(read.body).values()), {"PermissionError"}, read.text
            )
        accepted = {fd: r for fd, r in results.items() if r[0] >= 0}
        self.assertEqual(accepted, {}, "a descriptor took a Landlock rule")

    async def _holding_child(self) -> tuple[Deferred[Any], int, int]:
        """
        Have a handler hold its process for 3 s (it awaits): the pending
        response, the handler's pid and its zygote's, once the process has
        its channel and the descriptors its event loop makes when it first
        runs (a moment after the request arrives).
        """
        pending = Deferred.fromCoroutine(http(self.port, "/?x-haiku-handler=hold.py&wait=3"))
        await until(lambda: self.pool.status()["workers"].get("busy") == 1, 10)
        worker = next(iter(self.pool.workers))
        child, zygote = worker.child_pid, worker.pid
        await until(
            lambda: _fd_targets(child).get(3, "").startswith("socket:")
            and len([fd for fd in _fd_targets(child) if fd > 3]) >= 3,
            5,
            lambda: f"child {child} fds: {_fd_targets(child)}",
        )
        return pending, child, zygote

    async def test_every_descriptor_accounted_for(self) -> None:
        """
        A handler process holds exactly: C{/dev/null} on 0, a pipe of its
        own on 1 and 2 (read by its zygote alone), its own channel socket
        on 3, and what its own event loop made (an epoll and a socketpair).
        No descriptor it holds is shared with any other process but, for
        its output pipe, its zygote: not with a later handler, not with
        the zygote's other descriptors.
        """
        if os.uname().machine != "x86_64":
            raise SkipTest("kcmp's number is x86_64's here")
        pending, child, zygote = await self._holding_child()
        held = _fd_targets(child)
        # Capabilities: at most CAP_DAC_READ_SEARCH (bit 2) anywhere, the
        # bounding set included (emptied once, in the zygote).
        caps = _capabilities(child)
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(caps[name] & ~0x4, 0, (name, hex(caps[name])))
        self.assertEqual(held[0], "/dev/null")
        self.assertTrue(held[1].startswith("pipe:"), held)
        self.assertEqual(held[1], held[2])
        self.assertTrue(held[3].startswith("socket:"), held)
        rest = sorted(v.split(":")[0] for fd, v in held.items() if fd > 3)
        self.assertEqual(rest, ["anon_inode", "socket", "socket"], held)
        self.assertIn("anon_inode:[eventpoll]", held.values())
        self.assertNotIn("anon_inode:landlock-ruleset", held.values())
        # Pipes and sockets by inode: the output pipe's other end is the
        # zygote's; nobody else holds any of them.
        mine = {v for v in held.values() if v.startswith(("pipe:", "socket:"))}
        others = [pid for pid in _all_pids() if pid != child]
        for pid in others:
            shared = mine & set(_fd_targets(pid).values())
            if pid == zygote:
                self.assertEqual(shared, {held[1]}, f"shared with the zygote: {shared}")
            else:
                self.assertEqual(shared, set(), f"shared with process {pid}")
        # Every descriptor by open file (the epoll included): none is the
        # same open file as any descriptor of another process (kcmp works:
        # 1 and 2 are one file).
        self.assertTrue(_same_file(child, 1, child, 2))
        # (
        # same open file as any descriptor of another process.
        for pid in others:
            for fd in _fd_targets(pid):
                for mine_fd in held:
                    self.assertFalse(
                        _same_file(child, mine_fd, pid, fd),
                        f"fd {mine_fd} ({held[mine_fd]}) is fd {fd} of process {pid}",
                    )
        response = await pending
        self.assertEqual(response.status, 200)
        inside = {int(fd): mode for fd, mode in json.loads(response.body).items()}
        self.assertEqual(sorted(inside), sorted(held), "the handler sees other descriptors")
        self.assertEqual(inside[0], stat.S_IFCHR)
        self.assertEqual((inside[1], inside[3]), (stat.S_IFIFO, stat.S_IFSOCK))

    async def test_forker_holds_nothing(self) -> None:
        """
        A zygote's children are forked by its forker, a process of the
        zygote's own that holds nothing but its channel to the zygote and
        the zygote's standard streams, none of them an open file a handler
        holds; the handler's process is the zygote's child (which reaps it
        and whose death kills it), under the zygote's name.
        """
        if os.uname().machine != "x86_64":
            raise SkipTest("kcmp's number is x86_64's here")
        pending, child, zygote = await self._holding_child()
        forker = await _the_forker(zygote)
        self.assertEqual(_parent(child), zygote)
        self.assertEqual(_comm(child), _comm(zygote))
        held = _fd_targets(forker)
        self.assertEqual(sorted(held)[:3], [0, 1, 2], held)
        self.assertEqual(len(held), 4, held)
        self.assertTrue(held[max(held)].startswith("socket:"), held)
        for fd in held:
            for mine in _fd_targets(child):
                self.assertFalse(_same_file(forker, fd, child, mine),
                                 f"the forker's fd {fd} is the handler's fd {mine}")
        response = await pending
        self.assertEqual(response.status, 200)

    async def test_forker_killed(self) -> None:
        """
        A zygote whose forker has died ends at once (with its children),
        and its slot is started again: the next requests are served.
        """
        await self.victim("before")
        worker = next(iter(self.pool.workers))
        zygote = worker.pid
        forker = await _the_forker(zygote)
        os.kill(forker, 9)
        await until(lambda: not _alive(zygote), 10, lambda: "the zygote lives on")
        await until(lambda: any(w.pid not in (None, zygote) for w in self.pool.workers), 10)
        await ready(self.pool)
        for token in ("after", "again"):
            await self.victim(token)

    async def test_forker_out_of_reach(self) -> None:
        """
        A handler that probes every process by number (up to beyond its
        own) with C{kill} and C{pidfd_send_signal} can signal none, and its
        C{SIGKILL}s to its zygote and the zygote's forker fail: both live
        on, and the next request is served.
        """
        await self.victim("before")
        worker = next(iter(self.pool.workers))
        zygote = worker.pid
        forker = await _the_forker(zygote)
        response = await http(
            self.port, f"/?x-haiku-handler=signal-all.py&kill={zygote},{forker}"
        )
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(json.loads(response.body), {"reachable": [], "killed": []})
        self.assertTrue(_alive(forker) and _alive(zygote))
        self.assertIn(worker, self.pool.workers)
        self.assertEqual(worker.pid, zygote)
        await self.victim("after")

    async def test_identity(self) -> None:
        """
        A handler's process runs as its slot's uid and gid, real, effective
        and saved alike, with no supplementary groups and the
        keep-capabilities flag clear (the zygote set that flag and dropped
        the groups once for all its children), and cannot become root.
        """
        for _ in range(2):
            response = await http(self.port, "/?x-haiku-handler=identity.py")
            self.assertEqual(response.status, 200, response.text)
            report = json.loads(response.body)
            uid, gid = report["uids"][0], report["gids"][0]
            self.assertNotEqual(uid, 0)
            self.assertNotEqual(gid, 0)
            self.assertEqual(report, {"uids": [uid] * 3, "gids": [gid] * 3, "groups": [],
                                      "keep_caps": 0, "root": False})

    async def test_no_ipc(self) -> None:
        """
        System V shared memory, message queues and semaphores, POSIX
        message queues and shared memory are refused to one tenant's
        handler, and a later handler of another tenant finds nothing under
        the same names; /dev/shm and /dev/mqueue are unwritable.
        """
        put = await http(self.port, "/?x-haiku-handler=ipc.py&do=put&secret=tenant-a-secret")
        self.assertEqual(put.status, 200, put.text)
        wrote = json.loads(put.body)
        for call in ("shmget", "msgget", "semget", "mq_open"):
            self.assertEqual(wrote[call], "EPERM", (call, wrote))
        for path in ("/dev/shm/haikutx-test", "/dev/mqueue/haikutx-test"):
            self.assertIn(wrote[path], ("PermissionError", "FileNotFoundError"), wrote)
        self.assertEqual(wrote["/dev/shm:list"], "PermissionError")
        self.assertFalse(os.path.exists("/dev/shm/haikutx-test"))
        got = await http(self.port, "/?x-haiku-handler=ipc.py&do=get")
        self.assertEqual(got.status, 200, got.text)
        self.assertNotIn("tenant-a-secret", got.text)
        found = json.loads(got.body)
        for call in ("shmget", "msgget", "semget", "mq_open"):
            self.assertEqual(found[call], "EPERM", (call, found))


class LibraryPoolTests(TestCase):
    """
    A pool built in user code, with no options (SPEC 6), is as confined as
    the one twistd builds.
    """

    def setUp(self) -> Deferred[None]:
        _needs_full_sandbox()
        from twisted.web.server import Site

        from haikutx.runtime.loader import HandlerLoader
        from haikutx.runtime.pool import WorkerPool
        from haikutx.runtime.resource import HandlerResource

        handlers = Path(self.mktemp()).absolute()
        handlers.mkdir()
        (handlers / "connect.py").write_text(
            "import socket\n"
            "host, port = req.query['target'].rsplit(':', 1)\n"
            "socket.create_connection((host, int(port)), timeout=2)\n"
            "res.end('connected')\n"
        )
        self.pool = WorkerPool(reactor, size=1, max_requests=1)
        self.pool.startService()
        self.addCleanup(self.pool.stopService)
        loader = HandlerLoader(reactor, handlers, max_size=16384)
        site = Site(HandlerResource(reactor, self.pool, loader), reactor=reactor)
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_every_layer(self) -> None:
        """
        Every layer is active, the network namespace and IPC included, and
        a handler cannot connect to a listener on this machine.
        """
        layers = self.pool.status()["sandbox"]["layers"]
        for layer in ("rlimits", "no_new_privs", "landlock", "seccomp", "uid", "network", "ipc"):
            self.assertTrue(layers[layer].startswith("active"), (layer, layers[layer]))
        accepted = []

        class Count(Protocol):
            def connectionMade(self) -> None:
                accepted.append(1)

        listening = reactor.listenTCP(0, Factory.forProtocol(Count), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        target = f"127.0.0.1:{listening.getHost().port}"
        response = await http(self.port, f"/?x-haiku-handler=connect.py&target={target}")
        self.assertEqual(response.status, 500, response.text)
        self.assertEqual(accepted, [])

    def test_layer_off_by_name(self) -> None:
        """
        A layer is turned off by name only, and an unknown name is refused.
        """
        from haikutx.runtime.pool import PythonWorkerSpawner

        spawner = PythonWorkerSpawner(reactor, off=("network",))
        self.assertEqual(spawner.options["off"], ["network"])
        self.assertEqual(PythonWorkerSpawner(reactor).options["off"], [])
        self.assertRaises(ValueError, PythonWorkerSpawner, reactor, off=("netwrok",))


def _fd_targets(pid: int | None) -> dict[int, str]:
    """
    What each descriptor of process C{pid} is (readlink of /proc/PID/fd/N).
    """
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_KCMP = 312  # x86_64 and aarch64 differ; the test skips elsewhere
_KCMP_FILE = 0


def _same_file(pid1: int, fd1: int, pid2: int, fd2: int) -> bool:
    """
    Whether two descriptors of two processes are the same open file
    (C{kcmp(KCMP_FILE)}).
    """
    result = _libc.syscall(
        ctypes.c_long(_KCMP), ctypes.c_int(pid1), ctypes.c_int(pid2),
        ctypes.c_int(_KCMP_FILE), ctypes.c_ulong(fd1), ctypes.c_ulong(fd2),
    )
    return result == 0


def _capabilities(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1], 16)
            for line in f
            if line.startswith("Cap")
        }


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _forkers(zygote: int) -> list[int]:
    """
    The zygote's forker(s): its children named C{haiku-forker}.
    """
    return [pid for pid in _all_pids() if _parent(pid) == zygote and _comm(pid) == "haiku-forker"]


async def _the_forker(zygote: int) -> int:
    """
    The zygote's forker (waiting, bounded, while a child it has just
    forked has not yet taken the zygote's name back).
    """
    await until(lambda: len(_forkers(zygote)) == 1, 5,
                lambda: f"the zygote's forkers: {_forkers(zygote)}")
    return _forkers(zygote)[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answering(worker) -> bool:
    """
    Whether the worker's current child has sent its response's head.
    """
    child = worker.child
    return child is not None and getattr(child.exchange, "status", None) == 200


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
