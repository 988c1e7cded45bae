"""The neuromesh.py command run as a user runs it, in a process of its own, and the flags that keep
a `doctor` on loopback; a loopback port nobody answers on, for a server that is not there."""

import socket
import subprocess
import sys

from conftest import LOOPBACK_BROADCAST, ROOT, SCRIPT


def run_cli(*args, prefix=(), timeout=60):
    """``python3 neuromesh.py ARGS`` from the checkout (after ``prefix``, e.g. ``ip netns exec NS``)."""
    return subprocess.run(list(prefix) + [sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def loopback_doctor_flags(cluster, *extra):
    """`doctor` flags that listen and probe on loopback only, on ``cluster``'s UDP port, then ``extra``."""
    return ["--host", "127.0.0.1", "--broadcast", LOOPBACK_BROADCAST, "--udp-port", str(cluster.udp_port),
            "--http-port", "0", "--tcp-port", "0", "--announce-interval", "0.5"] + list(extra)


def closed_port():
    """A loopback TCP port nothing listens on (bound, then closed)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
    finally:
        sock.close()
