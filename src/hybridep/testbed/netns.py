"""Emulated multi-DC network: Linux network namespaces, veth pairs, bridges and htb shaping.

The emulated network mirrors the cost model's *port model* exactly. For a topology with levels
``l = 0 .. L-1``:

* one namespace ``hep-root`` with a bridge: the top of the tree;
* one namespace per worker of every level above the leaves (e.g. ``hep-w0`` for DC 0) with a bridge;
* one namespace per rank (``hep-r{rank}``) with one interface ``hep0`` holding its address;
* every worker (rank or bridge) is linked to its parent's bridge by a veth pair whose two ends
  are shaped with an htb class at that level's bandwidth: egress of the child end = the worker's
  uplink, egress of the parent end = its downlink. So all ranks of a DC share one DC uplink of
  the DC level's rate, exactly as the cost model charges them.

Latency cannot be emulated here (the kernel lacks ``netem``); the cost model accounts for it.
All names carry the prefix ``hep-``; :func:`down` removes every namespace with that prefix (which
removes the veths and bridges inside them), also after a crash.

Commands are built as argument lists by pure functions (unit-tested) and run by :func:`_sh`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hybridep.topology import Topology

PREFIX = "hep-"
ROOT_NS = f"{PREFIX}root"
SUBNET = "10.77"
IFACE = "hep0"
STATE_FILE = Path("/run") / "hybridep-testbed.json"
LOCK_FILE = Path("/run") / "hybridep-testbed.lock"
"""Held (``flock``) by a bench while its ranks use the testbed; released when that process ends."""
_held: int | None = None
"""The lock's file descriptor while this process holds it."""


class TestbedError(RuntimeError):
    """The testbed cannot be built or used; the message says why and what to do."""


def rank_ns(rank: int) -> str:
    return f"{PREFIX}r{rank}"


def rank_ip(rank: int) -> str:
    return f"{SUBNET}.{rank // 250}.{rank % 250 + 1}"


@dataclass(frozen=True)
class Link:
    """A veth pair from a child namespace (up end) to a parent bridge namespace (down end)."""

    child_ns: str
    parent_ns: str
    up_if: str        # name inside the child namespace
    down_if: str      # name inside the parent namespace
    level: int
    rate_bps: float   # bits per second, per direction


def worker_ns(level: int, index: int) -> str:
    """Namespace of the bridge of worker ``index`` (flat index over the level) of ``level``."""
    return f"{PREFIX}l{level}w{index}"


def plan_links(topology: Topology, rates_bps: tuple[float, ...]) -> tuple[list[str], list[str], list[Link]]:
    """Bridge namespaces, rank namespaces and links for a topology (pure: no side effects)."""
    counts = topology.counts
    L = len(counts)
    bridges = [ROOT_NS]
    links: list[Link] = []
    n_link = 0
    for level in range(L - 1):
        workers = int(__import__("math").prod(counts[: level + 1]))
        for w in range(workers):
            ns = worker_ns(level, w)
            bridges.append(ns)
            parent = ROOT_NS if level == 0 else worker_ns(level - 1, w // counts[level])
            links.append(Link(ns, parent, f"{PREFIX}u{n_link}", f"{PREFIX}d{n_link}", level, rates_bps[level]))
            n_link += 1
    ranks = [rank_ns(r) for r in range(topology.world_size)]
    for r in range(topology.world_size):
        parent = ROOT_NS if L == 1 else worker_ns(L - 2, r // counts[-1])
        links.append(Link(rank_ns(r), parent, IFACE, f"{PREFIX}d{n_link}", L - 1, rates_bps[L - 1]))
        n_link += 1
    return bridges, ranks, links


QUEUE_PACKETS = 20_000
"""Packets the bulk class of a shaped port may queue (~30 MB of full-size packets)."""


def _htb(ns: str, dev: str, rate_bps: float) -> list[list[str]]:
    """Shape ``dev``'s egress to ``rate_bps``: an htb root class 1:1 at the rate with two leaves --
    1:10 for pure TCP acknowledgements (small packets, served first) and 1:20 for everything else.

    Without the ACK class, the acknowledgements of one direction's transfers queue behind the
    other direction's bulk data (a 1000-packet FIFO is ~120 ms at 100 Mbit/s), which throttles TCP
    whenever both directions are busy -- an artefact of the emulation (measured: a symmetric
    all-to-all reached ~70 % of the rate, one direction alone ~96 %), not a property of a DC link.
    """
    rate = f"{int(rate_bps)}bit"
    ack_rate = f"{max(8_000, int(rate_bps / 20))}bit"
    bulk_rate = f"{max(8_000, int(rate_bps - rate_bps / 20))}bit"
    # burst: ~1 ms of traffic, at least 32 kB, so that htb reaches the set rate
    burst = f"{max(32_000, int(rate_bps / 8 / 1000))}b"
    tc = ["ip", "netns", "exec", ns, "tc"]
    return [
        [*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "20"],
        [*tc, "class", "replace", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate, "ceil", rate,
         "burst", burst, "cburst", burst],
        [*tc, "class", "replace", "dev", dev, "parent", "1:1", "classid", "1:10", "htb", "rate", ack_rate,
         "ceil", rate, "burst", burst, "cburst", burst, "prio", "0"],
        [*tc, "class", "replace", "dev", dev, "parent", "1:1", "classid", "1:20", "htb", "rate", bulk_rate,
         "ceil", rate, "burst", burst, "cburst", burst, "prio", "1"],
        # a queue deep enough that our transfers never tail-drop (see the docstring)
        [*tc, "qdisc", "replace", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", str(QUEUE_PACKETS)],
        # TCP (protocol 6), 20-byte IP header, total length < 128 bytes, flags = ACK only
        [*tc, "filter", "replace", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "10", "u32",
         "match", "ip", "protocol", "6", "0xff", "match", "u8", "0x05", "0x0f", "at", "0",
         "match", "u16", "0x0000", "0xff80", "at", "2", "match", "u8", "0x10", "0xff", "at", "33",
         "flowid", "1:10"],
    ]


def up_commands(topology: Topology, rates_bps: tuple[float, ...]) -> list[list[str]]:
    """Every command that builds the testbed, in order (pure)."""
    bridges, ranks, links = plan_links(topology, rates_bps)
    cmds: list[list[str]] = []
    for ns in bridges + ranks:
        cmds.append(["ip", "netns", "add", ns])
        cmds.append(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
    for ns in bridges:
        cmds.append(["ip", "netns", "exec", ns, "ip", "link", "add", "br0", "type", "bridge"])
        cmds.append(["ip", "netns", "exec", ns, "ip", "link", "set", "br0", "up"])
    for i, lk in enumerate(links):
        tmp_up, tmp_down = f"{PREFIX}tu{i}", f"{PREFIX}td{i}"
        cmds += [
            ["ip", "link", "add", tmp_up, "type", "veth", "peer", "name", tmp_down],
            ["ip", "link", "set", tmp_up, "netns", lk.child_ns],
            ["ip", "link", "set", tmp_down, "netns", lk.parent_ns],
            ["ip", "netns", "exec", lk.child_ns, "ip", "link", "set", tmp_up, "name", lk.up_if],
            ["ip", "netns", "exec", lk.parent_ns, "ip", "link", "set", tmp_down, "name", lk.down_if],
            ["ip", "netns", "exec", lk.parent_ns, "ip", "link", "set", lk.down_if, "master", "br0"],
            ["ip", "netns", "exec", lk.parent_ns, "ip", "link", "set", lk.down_if, "up"],
        ]
        if lk.child_ns.startswith(f"{PREFIX}l"):
            cmds.append(["ip", "netns", "exec", lk.child_ns, "ip", "link", "set", lk.up_if, "master", "br0"])
        cmds.append(["ip", "netns", "exec", lk.child_ns, "ip", "link", "set", lk.up_if, "up"])
        cmds += _htb(lk.child_ns, lk.up_if, lk.rate_bps) + _htb(lk.parent_ns, lk.down_if, lk.rate_bps)
    for r in range(topology.world_size):
        cmds.append(["ip", "netns", "exec", rank_ns(r), "ip", "addr", "add", f"{rank_ip(r)}/16", "dev", IFACE])
    return cmds


def existing_namespaces() -> list[str]:
    """Namespaces with the project prefix that exist now."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(PREFIX))


def down_commands(namespaces: list[str]) -> list[list[str]]:
    return [["ip", "netns", "delete", ns] for ns in namespaces]


def check_prerequisites() -> None:
    """Refuse clearly when the testbed cannot be built: not root, or ip/tc missing."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise TestbedError(f"the testbed needs {' and '.join(missing)} (package iproute2), not found on PATH")
    if os.geteuid() != 0:
        raise TestbedError("the testbed needs root (network namespaces and traffic shaping); run as root, "
                           "or run the benchmark unshaped")


def _sh(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise TestbedError(f"command failed ({proc.returncode}): {' '.join(cmd)}: {proc.stderr.strip()}")


@contextmanager
def hold() -> Iterator[None]:
    """Hold the testbed for this process while its ranks use it (``hybridep bench``): meanwhile
    :func:`up` and :func:`down` refuse in every other process, instead of pulling the network from
    under running ranks (which then stall until their collective timeout). The lock is released
    when the block ends or the process dies."""
    global _held
    fd = _lock()
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held = fd
    try:
        yield
    finally:
        _held = None
        os.close(fd)


def _lock() -> int:
    """The testbed lock, taken without waiting (its file descriptor), or :class:`TestbedError`
    naming the process that holds it."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TestbedError(f"the testbed is in use by a running hybridep bench (pid {pid}); wait for it to "
                           "finish or stop it first -- changing the testbed now would cut its ranks' "
                           "network") from None
    return fd


def _check_free() -> None:
    """Refuse (:class:`TestbedError`) when another process holds the testbed (see :func:`hold`). A
    process that may not open the lock file (not root) cannot change the testbed either."""
    if _held is not None:
        return
    try:
        os.close(_lock())
    except PermissionError:
        pass


def up(topology: Topology, rates_bps: tuple[float, ...]) -> dict:
    """Build the testbed (replacing any previous one). Returns the state written to STATE_FILE.
    Refuses while another process's bench uses the testbed (:func:`hold`)."""
    check_prerequisites()
    _check_free()
    down()
    try:
        for cmd in up_commands(topology, rates_bps):
            _sh(cmd)
    except TestbedError:
        down()
        raise
    state = {"names": list(topology.names), "counts": list(topology.counts), "rates_bps": list(rates_bps)}
    STATE_FILE.write_text(json.dumps(state))
    return state


def down() -> list[str]:
    """Remove every namespace with the project prefix (and with them their links). Idempotent.
    Refuses while another process's bench uses the testbed (:func:`hold`)."""
    _check_free()
    names = existing_namespaces()
    for cmd in down_commands(names):
        subprocess.run(cmd, capture_output=True, timeout=60)
    STATE_FILE.unlink(missing_ok=True)
    return names


def state() -> dict | None:
    """The testbed currently up (from STATE_FILE, checked against the namespaces), or None."""
    if not STATE_FILE.exists():
        return None
    try:
        st = json.loads(STATE_FILE.read_text())
    except ValueError:
        return None
    topo = Topology(tuple(st["names"]), tuple(st["counts"]))
    needed = set(plan_links(topo, tuple(st["rates_bps"]))[0]) | {rank_ns(r) for r in range(topo.world_size)}
    return st if needed <= set(existing_namespaces()) else None


def _class_sent(tc_output: str, classid: str) -> int:
    """The ``Sent N bytes`` counter of htb class ``classid`` in ``tc -s class show`` output."""
    current = None
    for line in tc_output.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "class":
            current = words[2]
        elif words[:1] == ["Sent"] and current == classid:
            return int(words[1])
    return 0


def uplink_bytes(topology: Topology, rates_bps: tuple[float, ...], level: int) -> int:
    """Bytes sent so far through the uplinks of ``level`` (htb class counters): traffic that left
    its level-``level`` worker -- for level 0, the cross-DC bytes."""
    _, _, links = plan_links(topology, rates_bps)
    total = 0
    for lk in links:
        if lk.level != level:
            continue
        out = subprocess.run(["ip", "netns", "exec", lk.child_ns, "tc", "-s", "class", "show", "dev", lk.up_if],
                             capture_output=True, text=True, timeout=30).stdout
        total += _class_sent(out, "1:1")
    return total
