"""
Tests for L{haikutx.sandbox.cgroup}: finding the cgroup v1 hierarchies (on
fake mount tables), and run groups on the real kernel (as root) with real
processes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from haikutx.sandbox.cgroup import CgroupTree, RunGroup, hierarchies


class HierarchiesTests(SynchronousTestCase):
    """
    L{hierarchies} finds this process's own cgroup in each controller's
    hierarchy, and says why a controller cannot be used.
    """

    def _files(self, mounts: str, own: str) -> tuple[str, str]:
        base = Path(self.mktemp())
        base.mkdir()
        (base / "mounts").write_text(mounts)
        (base / "cgroup").write_text(own)
        return str(base / "mounts"), str(base / "cgroup")

    def test_found_beneath_own_cgroup(self) -> None:
        """
        The directory is the hierarchy's mount point joined with this
        process's path in it.
        """
        root = Path(self.mktemp()).absolute()
        (root / "pids").mkdir(parents=True)
        (root / "mem" / "a" / "b").mkdir(parents=True)
        mounts, own = self._files(
            f"cgroup {root}/pids cgroup rw,relatime,pids 0 0\n"
            f"cgroup {root}/mem cgroup rw,relatime,memory 0 0\n"
            "tmpfs /tmp tmpfs rw 0 0\n",
            "8:pids:/\n4:memory:/a/b\n0::/\n",
        )
        found, missing = hierarchies(mounts, own)
        self.assertEqual(found, {"pids": f"{root}/pids", "memory": f"{root}/mem/a/b"})
        self.assertEqual(missing, {})

    def test_missing_and_read_only(self) -> None:
        """
        A controller that is not mounted, or mounted read-only, is named
        with the reason.
        """
        root = Path(self.mktemp()).absolute()
        (root / "pids").mkdir(parents=True)
        mounts, own = self._files(
            f"cgroup {root}/pids cgroup ro,relatime,pids 0 0\n"
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
            "8:pids:/\n",
        )
        found, missing = hierarchies(mounts, own)
        self.assertEqual(found, {})
        self.assertEqual(
            missing,
            {"pids": "cgroup v1 pids is mounted read-only",
             "memory": "no cgroup v1 memory hierarchy is mounted"},
        )


class RunGroupTests(SynchronousTestCase):
    """
    L{RunGroup} and L{CgroupTree} on this kernel's cgroup v1 hierarchies,
    with real processes.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("making cgroups needs root")
        self.tree = CgroupTree.create(pid=os.getpid())
        if not self.tree.complete():
            raise SkipTest(f"cgroup v1 pids and memory are needed: {self.tree.missing}")
        self.addCleanup(self.tree.remove)
        self.group = RunGroup.create(self.tree.directories, "slot7", 16, 64 << 20)

    def _start(self, script: str, group: RunGroup | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["/bin/sh", "-c", script],
            preexec_fn=(group or self.group).join,
            stdout=subprocess.PIPE,
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return process

    def test_limits(self) -> None:
        """
        The group's task and memory limits are set.
        """
        pids = Path(self.group.directories["pids"])
        memory = Path(self.group.directories["memory"])
        self.assertEqual((pids / "pids.max").read_text().strip(), "16")
        self.assertEqual(int((memory / "memory.limit_in_bytes").read_text()), 64 << 20)
        self.assertEqual(self.group.memory_limit(), 64 << 20)
        self.assertEqual(self.group.oom_kills(), 0)

    def test_kill_everything(self) -> None:
        """
        Every process of the group dies, those in a new session too; a
        process outside the group is not touched.
        """
        outside = subprocess.Popen(["/bin/sleep", "30"])
        self.addCleanup(outside.wait)
        self.addCleanup(outside.kill)
        process = self._start("setsid /bin/sleep 30 & (/bin/sleep 31 &); echo ready; "
                              "exec /bin/sleep 32")
        assert process.stdout is not None
        self.assertEqual(process.stdout.readline(), b"ready\n")
        self.assertGreaterEqual(len(self.group.pids()), 2)
        self.assertTrue(self.group.kill(wait=2.0))
        self.assertEqual(self.group.pids(), set())
        self.assertEqual(process.wait(5), -9)
        self.assertIsNone(outside.poll())

    def test_kill_keeps(self) -> None:
        """
        The pids given to C{keep} are spared.
        """
        kept = self._start("exec /bin/sleep 30")
        for _ in range(100):
            if kept.pid in self.group.pids():
                break
            time.sleep(0.01)
        self.assertTrue(self.group.kill(keep=[kept.pid], wait=1.0))
        self.assertEqual(self.group.pids(), {kept.pid})
        self.assertIsNone(kept.poll())

    def test_task_limit(self) -> None:
        """
        No more than C{pids.max} tasks run in the group at once.
        """
        small = RunGroup.create(self.tree.directories, "slot8", 3, None)
        process = self._start(
            "for i in 1 2 3 4 5; do /bin/sleep 30 >/dev/null 2>&1 & done; echo started", small
        )
        assert process.stdout is not None
        process.stdout.readline()
        self.assertLessEqual(len(small.pids()), 3)
        small.kill(wait=2.0)

    def test_oom_notifier(self) -> None:
        """
        The OOM eventfd becomes readable when the group's processes reach
        its memory limit, and C{oom_kills} counts the kernel's kills.
        """
        events = self.group.oom_notifier()
        assert events is not None
        self.addCleanup(os.close, events)
        process = self._start(
            "exec /usr/bin/python3 -c 'b = b\"x\" * (128 << 20)'"
            if os.path.exists("/usr/bin/python3") else "exit 9"
        )
        if process.wait(20) == 9:
            raise SkipTest("no /usr/bin/python3 to allocate memory with")
        self.assertEqual(process.returncode, -9)
        self.assertGreaterEqual(int.from_bytes(os.read(events, 8), "little"), 1)
        self.assertGreaterEqual(self.group.oom_kills(), 1)

    def test_remove_and_sweep(self) -> None:
        """
        L{CgroupTree.remove} kills what is left and removes the groups; a
        new tree removes the empty trees of servers that are gone.
        """
        self._start("exec /bin/sleep 30")
        dead = 2**22 + 12345  # above pid_max on most systems: never a live pid
        stale = os.path.join(os.path.dirname(self.tree.directories["pids"]),
                             f"haikutx-{dead}")
        os.mkdir(stale)
        os.mkdir(os.path.join(stale, "slot0"))
        self.addCleanup(lambda: os.path.isdir(stale) and os.rmdir(stale))
        other = CgroupTree.create(pid=os.getpid() + 2**22)
        other.remove()
        self.assertFalse(os.path.exists(stale))
        self.tree.remove()
        for directory in self.tree.directories.values():
            self.assertFalse(os.path.exists(directory))


class ReportTests(SynchronousTestCase):
    """
    The zygote says how a stdio handler's processes are bounded, and why
    not when it cannot.
    """

    def test_missing_controllers(self) -> None:
        """
        Without cgroups from the server, the layer is unavailable, and the
        report says why and what still holds.
        """
        from haikutx.child.slot_setup import run_group as _run_group

        text = _run_group({"cgroup": {"directories": {}, "missing": {
            "pids": "no cgroup v1 pids hierarchy is mounted"}}})
        self.assertTrue(
            text.startswith("unavailable: no cgroup v1 pids hierarchy is mounted: "), text
        )
        self.assertIn("RLIMIT_NPROC", text)
        self.assertTrue(_run_group({}).startswith("unavailable: no cgroups were set up"))


class TurnedOffTests(TestCase):
    """
    A pool built with C{off=("processes",)} makes no cgroups, and says so.
    """

    async def test_turned_off_by_name(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("the sandbox layers need root")
        from twisted.internet import reactor

        from haikutx.runtime.pool import PythonWorkerSpawner, WorkerPool
        from haikutx.test.support import ready

        spawner = PythonWorkerSpawner(reactor, off=("processes",))
        pool = WorkerPool(reactor, size=1, max_requests=1, spawner=spawner)
        pool.startService()
        self.addCleanup(pool.stopService)
        await ready(pool)
        layers = pool.status()["sandbox"]["layers"]
        self.assertTrue(layers["processes"].startswith("turned off by name"), layers)
        self.assertIsNone(spawner._cgroups)


class SlotGroupTests(SynchronousTestCase):
    """
    L{haikutx.runtime.rungroup.SlotGroup} on this kernel's cgroups: each
    child gets a group of its own, reused only once empty.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("making cgroups needs root")
        from twisted.internet.testing import MemoryReactorClock

        from haikutx.runtime.rungroup import SlotGroup

        tree = CgroupTree.create(pid=os.getpid())
        if not tree.complete():
            raise SkipTest(f"cgroup v1 pids and memory are needed: {tree.missing}")
        self.addCleanup(tree.remove)
        self.slot = SlotGroup(
            MemoryReactorClock(), RunGroup.create(tree.directories, "slot9", None, None),
            8, 64 << 20,
        )
        self.addCleanup(self.slot.stop)

    def _child(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["/bin/sleep", "30"])
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        return process

    def _admit(self, process: subprocess.Popen[bytes]) -> int:
        class Child:
            pid = process.pid

        self.slot.admit(object(), Child())
        return self.slot._by_pid[process.pid]

    def test_ended_without_leftovers(self) -> None:
        """
        A child whose handlers cannot have started processes leaves its
        group unlisted and unkilled when it ends; a group still holding a
        task is not given to the next child, an empty one is.
        """
        first = self._child()
        number = self._admit(first)
        self.slot.child_ended(first.pid, leftovers=False)
        self.assertIsNone(first.poll())
        second = self._child()
        self.assertNotEqual(self._admit(second), number)
        self.assertEqual(first.wait(5), -9)  # killed when found still there
        third = self._child()
        self.assertEqual(self._admit(third), number)

    def test_ended_with_leftovers(self) -> None:
        """
        By default what is left in a child's group is killed when it ends.
        """
        first = self._child()
        self._admit(first)
        self.slot.child_ended(first.pid)
        self.assertEqual(first.wait(5), -9)
