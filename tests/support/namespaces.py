"""Network namespaces for tests that need more than loopback: test hosts on a bridge of their own.

Each host is a namespace with a unique name and one address on a private /24 of the test's own;
the bridge lives in a namespace too, so this machine's network is never touched. Linux and root
only: ``needs_namespaces`` skips a test elsewhere, saying why.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest


def namespaces_missing():
    """Why this machine cannot make network namespaces (a reason to skip), or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "needs root for `ip netns`"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    return None


class Namespaces:
    """Test hosts (three unless ``count`` says) on a bridge that lives in a namespace of its own (the host is untouched)."""

    def __init__(self, count=3):
        tag = uuid.uuid4().hex[:6]
        self.hub = "nmhub" + tag
        self.hosts = ["nm%s%d" % (tag, i) for i in range(1, count + 1)]
        self.subnet = "10.77.%d" % (int(tag[:2], 16) % 250 + 1)

    def ip(self, *args):
        subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=20)

    def create(self):
        self.ip("netns", "add", self.hub)
        self.ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.hub, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts, start=1):
            self.ip("netns", "add", host)
            self.ip("-n", self.hub, "link", "add", "veth%d" % index, "type", "veth", "peer", "name", "eth0",
                    "netns", host)
            self.ip("-n", self.hub, "link", "set", "veth%d" % index, "master", "br0")
            self.ip("-n", self.hub, "link", "set", "veth%d" % index, "up")
            self.ip("-n", host, "link", "set", "lo", "up")
            self.ip("-n", host, "addr", "add", "%s.%d/24" % (self.subnet, index), "brd", "+", "dev", "eth0")
            self.ip("-n", host, "link", "set", "eth0", "up")

    def delete(self):
        for name in self.hosts + [self.hub]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)

    def fetch_status(self, host, url):
        code = ("import urllib.request, urllib.error\ntry:\n urllib.request.urlopen(%r, timeout=5)\n print(200)\n"
                "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())") % url
        result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=20)
        status, _, body = result.stdout.partition("\n")
        return int(status), body

    def fetch_json(self, host, url):
        code = "import json,urllib.request;print(urllib.request.urlopen(%r, timeout=5).read().decode())" % url
        result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            raise ValueError(result.stderr)
        return json.loads(result.stdout)


needs_namespaces = pytest.mark.skipif(namespaces_missing() is not None, reason=str(namespaces_missing()))
