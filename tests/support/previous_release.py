"""The previous release of NeuroMesh as a runnable copy, for tests of mixed versions in one room."""

import os
import re
import subprocess

import pytest

import neuromesh as nm
from conftest import ROOT


def previous_release(tmp_path):
    """The previous release as a runnable copy: (its name, its version, its protocol, path to its
    neuromesh.py). The newest v* tag whose __version__ differs from this code's; in a clone
    without tags, the last commit before __version__ last changed. Skips when git is absent."""
    def git(*args):
        return subprocess.run(["git"] + list(args), cwd=ROOT, capture_output=True, timeout=30)
    try:
        tags = git("tag", "--list", "v*", "--sort=-v:refname").stdout.decode().split()
        bumps = git("log", "--format=%H", "-G", "^__version__ = ", "--", "neuromesh.py").stdout.decode().split()
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip("git is not available here (%s): the previous release cannot be read" % error)
    for name in tags + [commit + "^" for commit in bumps]:
        shown = git("show", "%s:neuromesh.py" % name)
        match = re.search(rb'^__version__ = "([^"]+)"', shown.stdout, re.M)
        if shown.returncode == 0 and match and match.group(1).decode() != nm.__version__:
            folder = tmp_path / "previous-release"
            folder.mkdir()
            (folder / "neuromesh.py").write_bytes(shown.stdout)
            for static in ("_vendor", "neuromesh_static"):
                os.symlink(os.path.join(ROOT, static), str(folder / static))
            protocol = re.search(rb"^PROTOCOL_VERSION = (\d+)", shown.stdout, re.M)
            return name, match.group(1).decode(), int(protocol.group(1)), str(folder / "neuromesh.py")
    pytest.skip("no earlier release than %s in this clone's history (a shallow clone?)" % nm.__version__)
