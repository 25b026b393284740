"""Testbed: command construction and cleanup (pure), a real 2 x 2 testbed (root), the launcher."""

import os
import shutil
import sys
import time

import pytest

from hybridep.launch import RankFailedError
from hybridep.testbed import netns
from hybridep.testbed.launcher import launch, rank_command, rank_env
from hybridep.topology import Topology

ROOT = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


def test_plan_links_mirror_the_port_model():
    bridges, ranks, links = netns.plan_links(Topology(("dc", "gpu"), (2, 3)), (1e8, 1e9))
    assert bridges == ["hep-root", "hep-l0w0", "hep-l0w1"] and ranks == [f"hep-r{r}" for r in range(6)]
    dc_links = [lk for lk in links if lk.level == 0]
    assert [(lk.child_ns, lk.parent_ns, lk.rate_bps) for lk in dc_links] == [
        ("hep-l0w0", "hep-root", 1e8), ("hep-l0w1", "hep-root", 1e8)]
    rank_links = [lk for lk in links if lk.level == 1]
    assert [lk.parent_ns for lk in rank_links] == ["hep-l0w0"] * 3 + ["hep-l0w1"] * 3
    assert all(lk.up_if == netns.IFACE for lk in rank_links)
    # three levels: node bridges hang under DC bridges
    _, _, links3 = netns.plan_links(Topology(("dc", "node", "gpu"), (2, 2, 2)), (1e8, 1e9, 1e10))
    node_links = [lk for lk in links3 if lk.level == 1]
    assert [(lk.child_ns, lk.parent_ns) for lk in node_links] == [
        ("hep-l1w0", "hep-l0w0"), ("hep-l1w1", "hep-l0w0"), ("hep-l1w2", "hep-l0w1"), ("hep-l1w3", "hep-l0w1")]
    assert all(len(lk.up_if) <= 15 and len(lk.down_if) <= 15 for lk in links3)


def test_up_commands_shape_both_directions_of_every_link():
    topo = Topology(("dc", "gpu"), (2, 2))
    cmds = netns.up_commands(topo, (1e8, 1e9))
    _, _, links = netns.plan_links(topo, (1e8, 1e9))
    for lk in links:
        for ns, dev in ((lk.child_ns, lk.up_if), (lk.parent_ns, lk.down_if)):
            mine = [c for c in cmds if c[:3] == ["ip", "netns", "exec"] and c[3] == ns and dev in c]
            root = [c for c in mine if "class" in c and c[c.index("classid") + 1] == "1:1"]
            assert len(root) == 1 and root[0][root[0].index("rate") + 1] == f"{int(lk.rate_bps)}bit"
            # both leaves may borrow up to the rate and no more; pure ACKs go to the priority leaf
            leaves = [c for c in mine if "class" in c and c[c.index("parent") + 1] == "1:1"]
            assert sorted(c[c.index("classid") + 1] for c in leaves) == ["1:10", "1:20"]
            assert all(c[c.index("ceil") + 1] == f"{int(lk.rate_bps)}bit" for c in leaves)
            filt = [c for c in mine if "filter" in c]
            assert len(filt) == 1 and filt[0][-1] == "1:10"
    names = {c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]}
    assert all(n.startswith(netns.PREFIX) for n in names) and len(names) == 7
    addrs = [c for c in cmds if "addr" in c]
    assert [c[-3] for c in addrs] == [f"{netns.rank_ip(r)}/16" for r in range(4)]


def test_uplink_counter_reads_the_root_class():
    out = ("class htb 1:10 parent 1:1 prio 0 rate 5Mbit ceil 100Mbit\n Sent 132 bytes 2 pkt (dropped 0)\n"
           "class htb 1:1 root rate 100Mbit ceil 100Mbit\n Sent 13707416 bytes 9086 pkt (dropped 0)\n"
           "class htb 1:20 parent 1:1 prio 1 rate 95Mbit\n Sent 13707284 bytes 9084 pkt (dropped 0)\n")
    assert netns._class_sent(out, "1:1") == 13707416
    assert netns._class_sent(out, "1:30") == 0


def test_down_removes_exactly_the_prefixed_namespaces():
    assert netns.down_commands(["hep-r0", "hep-root"]) == [["ip", "netns", "delete", "hep-r0"],
                                                            ["ip", "netns", "delete", "hep-root"]]


def test_a_running_bench_holds_the_testbed_against_other_processes(tmp_path, monkeypatch, capsys):
    """While one process holds the testbed (a bench's ranks use it), up and down in another process
    refuse with the holder's pid instead of cutting its network; the lock goes with the process."""
    import subprocess
    import sys

    lock = tmp_path / "testbed.lock"
    monkeypatch.setattr(netns, "LOCK_FILE", lock)
    monkeypatch.setattr(netns, "check_prerequisites", lambda: None)
    removed = []
    monkeypatch.setattr(netns, "existing_namespaces", lambda: removed.append("listed") or [])
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom hybridep.testbed import netns\n"
         f"netns.LOCK_FILE = Path({str(lock)!r})\nwith netns.hold():\n    print('held', flush=True)\n"
         "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for action in (netns.down, lambda: netns.up(Topology(("dc", "gpu"), (2, 2)), (1e8, 1e9))):
            with pytest.raises(netns.TestbedError, match=f"in use by a running hybridep bench \\(pid {holder.pid}\\)"):
                action()
        from hybridep.cli import main

        assert main(["testbed", "down"]) == 2 and "testbed down refused" in capsys.readouterr().out
        assert removed == []  # refused before touching anything
        with pytest.raises(netns.TestbedError, match="in use"), netns.hold():  # nor can it take the testbed
            pass
    finally:
        holder.kill()
        holder.wait()
    assert netns.down() == [] and removed == ["listed"]  # free again once the holder is gone


def test_rank_command_and_environment():
    assert rank_command(3, ["python", "x"], True) == ["ip", "netns", "exec", "hep-r3", "python", "x"]
    assert rank_command(3, ["python", "x"], False) == ["python", "x"]
    env = rank_env(2, 4, 29500, True, base={})
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == netns.rank_ip(0)
    assert env["GLOO_SOCKET_IFNAME"] == netns.IFACE and env["MASTER_PORT"] == "29500"


def test_prerequisites_refuse_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.TestbedError, match="needs root"):
        netns.check_prerequisites()
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else "/bin/ip")
    with pytest.raises(netns.TestbedError, match="tc"):
        netns.check_prerequisites()


@pytest.mark.skipif(not ROOT, reason="needs root and iproute2 (network namespaces, htb)")
def test_real_testbed_rates_and_cleanup():
    from hybridep.testbed.rate_probe import measure

    topo = Topology(("dc", "gpu"), (2, 2))
    try:
        netns.up(topo, (100e6, 1e9))
        assert netns.state() is not None
        netns.up(topo, (100e6, 1e9))  # idempotent: replaces the previous one
        # best of three 1-s probes: the probe's sender and receiver are Python processes on the
        # host's shared cores, and at 1 Gbit/s a busy host can hold one probe below the link rate
        cross = max(measure(0, 2, seconds=1.0) for _ in range(3))
        inside = max(measure(0, 1, seconds=1.0) for _ in range(3))
        assert cross == pytest.approx(100e6, rel=0.15)
        assert inside == pytest.approx(1e9, rel=0.15)
    finally:
        netns.down()
    assert netns.existing_namespaces() == [] and netns.state() is None


def test_launcher_names_the_failed_rank_and_stops_the_others(tmp_path):
    code = ("import os, sys, time\n"
            "r = int(os.environ['RANK'])\n"
            "if r == 1:\n    time.sleep(0.5); print('boom on rank 1'); sys.exit(3)\n"
            "time.sleep(120)\n")
    start = time.monotonic()
    with pytest.raises(RankFailedError) as ei:
        launch([sys.executable, "-c", code], 3, tmp_path / "logs", False, timeout_s=60)
    assert ei.value.rank == 1 and "code 3" in str(ei.value) and "boom on rank 1" in str(ei.value)
    assert time.monotonic() - start < 30


def test_launcher_timeout_stops_everything(tmp_path):
    with pytest.raises(RankFailedError, match="timed out"):
        launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, tmp_path / "logs", False, timeout_s=2)


STALL = """
import os, time
import torch, torch.distributed as dist
from datetime import timedelta
from hybridep.parallel.comm import Communicator
from hybridep.topology import Topology
dist.init_process_group("gloo", timeout=timedelta(seconds=3))
rank = dist.get_rank()
comm = Communicator(Topology(("gpu",), (3,)), 3.0)
comm.create_groups([[0, 1, 2]])
t = torch.ones(3, 2)
comm.all_to_all(torch.empty_like(t), t, [1, 1, 1], [1, 1, 1], [0, 1, 2], "a2a")
if rank == 1:
    time.sleep(60)
comm.all_to_all(torch.empty_like(t), t, [1, 1, 1], [1, 1, 1], [0, 1, 2], "a2a")
"""


def test_launcher_names_the_rank_that_stalled_alive(tmp_path):
    """Rank 1 stays alive outside the communicator; ranks 0 and 2 time out in their second exchange:
    the launcher names rank 1, not the ranks that waited for it."""
    start = time.monotonic()
    with pytest.raises(RankFailedError) as ei:
        launch([sys.executable, "-c", STALL], 3, tmp_path / "logs", False, timeout_s=60)
    assert ei.value.rank == 1
    msg = str(ei.value)
    assert "rank 1 stalled: ranks [0, 2] waited" in msg and "a2a (call #2 in group [0, 1, 2])" in msg
    assert time.monotonic() - start < 40
