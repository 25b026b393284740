"""Point-to-point rate probe between two ranks of the testbed (TCP, a short timed stream).

Run as ``python -m hybridep.testbed.rate_probe serve IP PORT`` in the receiver's namespace and
``python -m hybridep.testbed.rate_probe send IP PORT SECONDS`` in the sender's. The receiver prints the
measured rate in bits/s (from its first to its last received byte).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from hybridep.testbed.netns import rank_ip, rank_ns

CHUNK = 1 << 20


def serve(ip: str, port: int) -> float:
    with socket.create_server((ip, port)) as srv:
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            total, first, last = 0, None, None
            buf = bytearray(CHUNK)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                now = time.perf_counter()
                if first is None:  # the clock starts at the first bytes, which are not counted
                    first = now
                else:
                    total += n
                last = now
    return 8.0 * total / (last - first) if first and last and last > first else 0.0


def send(ip: str, port: int, seconds: float) -> None:
    payload = b"\0" * CHUNK
    for _ in range(100):
        try:
            sock = socket.create_connection((ip, port), timeout=10)
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"probe: cannot connect to {ip}:{port}")
    with sock:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            sock.sendall(payload)


def measure(src: int, dst: int, seconds: float = 1.0, port: int = 29999) -> float:
    """Rate (bits/s) from rank ``src`` to rank ``dst`` through the testbed."""
    py = sys.executable
    server = subprocess.Popen(["ip", "netns", "exec", rank_ns(dst), py, "-m", "hybridep.testbed.rate_probe", "serve",
                               rank_ip(dst), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        subprocess.run(["ip", "netns", "exec", rank_ns(src), py, "-m", "hybridep.testbed.rate_probe", "send",
                        rank_ip(dst), str(port), str(seconds)], check=True, timeout=seconds + 60)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    return float(out.strip() or 0.0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        print(serve(sys.argv[2], int(sys.argv[3])))
    else:
        send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
