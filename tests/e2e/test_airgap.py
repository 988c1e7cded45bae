"""One file for air-gapped rooms, offline installs, and the installers kept in step.

The bundle is built once per session with `./install.sh --bundle` in a copy of the program; the
tests skip (saying why) only when pip cannot reach a package index.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, Cluster, NodeProcess, fully_linked, wait_for
from support.fake_ollama import FakeOllama

MODEL = "llama3.2:1b"
PROGRAM_FILES = ("neuromesh.py", "neuromesh_static", "requirements.txt", "requirements-dev.txt", "install.sh",
                 "install.ps1")


def copy_program(destination):
    """The files a user gets, copied to ``destination`` (no _vendor, no dist)."""
    os.makedirs(str(destination), exist_ok=True)
    for name in PROGRAM_FILES:
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(str(destination), name))
        else:
            shutil.copy2(source, str(destination))
    return str(destination)


def python39():
    """A real Python 3.9 (on PATH, or installed by pyenv), or None."""
    candidates = [shutil.which("python3.9")]
    pyenv = subprocess.run(["sh", "-c", "pyenv root 2>/dev/null"], capture_output=True, text=True).stdout.strip()
    candidates += sorted(glob.glob(os.path.join(pyenv or "/nonexistent", "versions", "3.9*", "bin", "python3.9")))
    for candidate in filter(None, candidates):
        check = subprocess.run([candidate, "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 9))"],
                               capture_output=True)
        if check.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="session")
def pip_index(tmp_path_factory):
    """Skips the test when pip cannot reach a package index (a machine with no network)."""
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "six==1.17.0", "-d", str(tmp_path_factory.mktemp("probe"))],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("pip cannot reach a package index: %s" % probe.stderr.strip().splitlines()[-1:])


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, pip_index):
    """``./install.sh --bundle`` in a fresh copy: ``(path of the .pyz, path of the folder)``."""
    checkout = copy_program(tmp_path_factory.mktemp("checkout") / "neuromesh")
    build = subprocess.run(["sh", "install.sh", "--bundle"], cwd=checkout, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    import neuromesh
    name = "neuromesh-%s" % neuromesh.__version__
    pyz, folder = os.path.join(checkout, "dist", name + ".pyz"), os.path.join(checkout, "dist", name)
    assert "Done: %s" % pyz in build.stdout
    assert not os.path.exists(os.path.join(checkout, "_vendor"))  # a bundle installs nothing
    return pyz, folder


@pytest.fixture(scope="session")
def bare_pythons(tmp_path_factory):
    """Virtual environments with nothing installed (no pip, no site packages), by Python version."""
    found = {"3.%d" % sys.version_info[1]: sys.executable}
    if python39():
        found["3.9"] = python39()
    bare = {}
    for version, base in found.items():
        target = tmp_path_factory.mktemp("venv" + version)
        subprocess.run([base, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
        bare[version] = os.path.join(str(target), "bin", "python")
    return bare


def snapshot(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, files in os.walk(folder) for name in dirs + files)


def run_bundled_node(tmp_path, program, cwd_files):
    """A mesh of a normal node with the fake LLM and a bundled node without one: the bundled node
    links, serves its page from inside the bundle, and answers a chat through the mesh."""
    before = snapshot(cwd_files)
    fake = FakeOllama(models=(MODEL,), token_delay=0.01).start()
    cluster = Cluster(tmp_path)
    try:
        host = cluster.start("host", extra=["--ollama-url", fake.url])
        bundled = NodeProcess(tmp_path / "bundled-data", cluster.node_args(), "bundled", program=program)
        cluster.nodes.append(bundled)
        bundled.start(timeout=30)
        wait_for(lambda: fully_linked([host, bundled]), message="the bundled node links")
        page = bundled.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "NeuroMesh" in page.text and "<script" in page.text
        script = bundled.get("/static/app.js")
        assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
        assert script.content == open(os.path.join(ROOT, "neuromesh_static", "app.js"), "rb").read()
        assert bundled.get("/static/no-such-file.js").status_code == 404
        assert bundled.get("/static/../neuromesh.py").status_code == 404
        wait_for(lambda: bundled.json("/api/models")["llm_hosts"] == 1, timeout=15, message="the LLM host is known")
        conversation = bundled.post("/api/conversations", json={}).json()["id"]
        reply = bundled.post("/api/conversations/%s/messages" % conversation, json={"content": "Hello, mesh?"},
                             headers={"Accept": "application/json"}, timeout=30)
        assert reply.status_code == 201, reply.text
        assert reply.json()["assistant"]["content"].startswith("Echo from %s: Hello, mesh?" % MODEL)
        assert reply.json()["assistant"]["answered_by"] == host.node_id
        version = bundled.get("/api/health").json()["python"]
    finally:
        cluster.close()
        fake.stop()
    assert snapshot(cwd_files) == before, "the bundle wrote beside itself"
    return version


@pytest.mark.parametrize("form", ["pyz", "folder"])
@pytest.mark.parametrize("version", ["current", "3.9"])
def test_the_bundle_runs_with_python_I_and_nothing_installed(bundle, bare_pythons, tmp_path, form, version):
    if version == "3.9" and "3.9" not in bare_pythons:
        pytest.skip("no Python 3.9 on this machine")
    python = bare_pythons["3.9" if version == "3.9" else "3.%d" % sys.version_info[1]]
    pyz, folder = bundle
    place = tmp_path / "usb-stick"
    place.mkdir()
    if form == "pyz":
        target = shutil.copy2(pyz, str(place))
    else:
        target = shutil.copytree(folder, str(place / os.path.basename(folder)))
    # nothing importable outside the bundle: the bare venv has no packages at all
    bare = subprocess.run([python, "-I", "-c", "import requests"], capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'requests'" in bare.stderr
    report = subprocess.run([python, "-I", target, "--version"], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "requests 2.32.5 from %s" % os.path.join(target, "requests") in report.stdout
    ran_on = run_bundled_node(tmp_path, [python, "-I", target], str(place))
    assert ran_on.startswith("3.9." if version == "3.9" else "3.%d." % sys.version_info[1])


def test_the_bundle_holds_the_program_its_page_and_only_the_pinned_runtime_packages(bundle):
    import zipfile
    pyz, folder = bundle
    with zipfile.ZipFile(pyz) as archive:
        names = set(archive.namelist())
        main = archive.read("__main__.py").decode()
    assert {"__main__.py", "neuromesh.py", "neuromesh_static/index.html", "neuromesh_static/app.js",
            "certifi/cacert.pem", "requests/__init__.py", "waitress/server.py", "bottle.py", "ecdsa/__init__.py",
            "ifaddr/__init__.py", "six.py"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") or name.startswith("bin/") for name in names)
    assert not any(name.startswith(("pytest", "hypothesis", "_vendor/")) for name in names)
    assert "sys.dont_write_bytecode = True" in main
    pinned = {line.split("==")[0].lower().replace("-", "_") + "-" + line.split("==")[1].strip()
              for line in open(os.path.join(ROOT, "requirements.txt")) if "==" in line and not line.startswith("#")}
    shipped = {name.split("/")[0][:-len(".dist-info")].lower() for name in names if ".dist-info/" in name}
    assert shipped == pinned
    assert set(snapshot(folder)) >= {"__main__.py", "neuromesh.py", os.path.join("neuromesh_static", "app.js")}


# ---- the pinned runtime wheels on every OS --------------------------------------------------------

@pytest.mark.parametrize("platform", ["win_amd64", "macosx_11_0_arm64", "manylinux2014_x86_64"])
def test_the_pinned_runtime_wheels_resolve_for_python_3_9_on_each_os(pip_index, tmp_path, platform):
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--platform", platform,
                             "--python-version", "3.9", "-r", os.path.join(ROOT, "requirements.txt"),
                             "-d", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheels = sorted(os.listdir(str(tmp_path)))
    pinned = [line.split("==")[0].strip().lower().replace("-", "_") for line in
              open(os.path.join(ROOT, "requirements.txt")) if "==" in line and not line.startswith("#")]
    assert len(wheels) == len(pinned), wheels  # nothing beyond the pins: every dependency is pinned
    for name in pinned:
        assert any(wheel.lower().startswith(name + "-") for wheel in wheels), (name, wheels)


# ---- offline install ----------------------------------------------------------------------------

def test_a_wheelhouse_filled_online_installs_offline(pip_index, tmp_path):
    online = copy_program(tmp_path / "online")
    env = dict(os.environ, PYTHON=sys.executable)
    filled = subprocess.run(["sh", "install.sh", "--wheelhouse", "../wheels"], cwd=online, capture_output=True,
                            text=True, timeout=600, env=env)
    assert filled.returncode == 0, filled.stderr[-3000:]
    assert "./install.sh --offline wheels" in filled.stdout
    wheels = os.listdir(str(tmp_path / "wheels"))
    assert "requirements.txt" in wheels and any(name.startswith("waitress-3.0.2") for name in wheels)
    offline = copy_program(tmp_path / "offline")
    # --no-index and only the folder: an index in pip's config must not be used either
    installed = subprocess.run(["sh", "install.sh", "--offline", str(tmp_path / "wheels")], cwd=offline,
                               capture_output=True, text=True, timeout=600,
                               env=dict(env, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_FIND_LINKS="",
                                        PIP_EXTRA_INDEX_URL=""))
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    version = subprocess.run([sys.executable, "-I", os.path.join(offline, "neuromesh.py"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert "waitress 3.0.2 from %s" % os.path.join(offline, "_vendor", "waitress") in version.stdout, version.stderr
    missing = subprocess.run(["sh", "install.sh", "--offline", str(tmp_path / "nowhere")], cwd=offline,
                             capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 1 and "./install.sh --wheelhouse DIR" in missing.stderr


# ---- install.sh's messages, with fake Pythons on a bare PATH -----------------------------------------

def bare_path(tmp_path, pythons=None):
    """A PATH holding only the tools install.sh uses, plus the given fake ``{name: script}``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("dirname", "basename", "cat", "tr", "mkdir", "cp", "rm", "find", "wc"):
        os.symlink(shutil.which(tool), str(folder / tool))
    for name, script in (pythons or {}).items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
    return str(folder)


def run_install(tmp_path, *args, pythons=None):
    env = {"PATH": bare_path(tmp_path, pythons), "HOME": str(tmp_path)}
    return subprocess.run(["/bin/sh", os.path.join(ROOT, "install.sh")] + list(args), capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(tmp_path))


def test_install_sh_without_python_says_how_to_get_one(tmp_path):
    result = run_install(tmp_path)
    assert result.returncode == 1
    assert "needs Python 3.9 or newer, and none was found" in result.stderr
    assert "sudo apt install python3 python3-pip" in result.stderr and "PYTHON=/path/to/python3" in result.stderr


def test_install_sh_names_an_old_python(tmp_path):
    old = 'case "$*" in *version_info*) echo "3 7 3" ;; esac\n'
    result = run_install(tmp_path, pythons={"python3": old})
    assert result.returncode == 1
    assert "this machine's is older" in result.stderr and "python3 is Python 3.7.3" in result.stderr


def wrapper(body):
    """A fake python3: ``body`` decides, else the real interpreter runs."""
    return body + 'exec %s "$@"\n' % sys.executable


def test_install_sh_without_pip_gives_the_commands(tmp_path):
    no_pip = wrapper('[ "$1 $2" = "-m pip" ] && { echo "No module named pip" >&2; exit 1; }\n'
                     'case "$*" in *EXTERNALLY-MANAGED*) exit 1 ;; esac\n')
    result = run_install(tmp_path, pythons={"python3": no_pip})
    assert result.returncode == 1
    assert "pip is not available for python3" in result.stderr
    assert "-m ensurepip --upgrade" in result.stderr and "./install.sh --bundle" in result.stderr


def test_install_sh_on_a_pep_668_system_python_explains_it(tmp_path):
    managed = wrapper('case "$*" in *EXTERNALLY-MANAGED*) exit 0 ;; esac\n'
                      '[ "$1 $2 $3" = "-m pip --version" ] && { echo "pip 23.0"; exit 0; }\n'
                      '[ "$1 $2" = "-m pip" ] && { echo "error: externally-managed-environment" >&2; exit 1; }\n')
    result = run_install(tmp_path, pythons={"python3": managed})
    assert result.returncode == 1
    assert "managed by the OS (PEP 668)" in result.stderr and "-m venv" in result.stderr
    without_pip = wrapper('case "$*" in *EXTERNALLY-MANAGED*) exit 0 ;; esac\n'
                          '[ "$1 $2" = "-m pip" ] && exit 1\n')
    (tmp_path / "second").mkdir()
    result = run_install(tmp_path / "second", pythons={"python3": without_pip})
    assert "(PEP 668)" in result.stderr and "sudo apt install python3-pip" in result.stderr


def test_install_sh_refuses_unknown_and_half_given_options(tmp_path):
    assert run_install(tmp_path, "--offlne").returncode == 2
    result = subprocess.run(["sh", os.path.join(ROOT, "install.sh"), "--offline"], capture_output=True, text=True)
    assert result.returncode == 1 and "--offline needs a folder" in result.stderr


# ---- install.ps1 in step with install.sh (no PowerShell here) -------------------------------------

def sh_flags():
    usage = open(os.path.join(ROOT, "install.sh")).read().split("usage() {")[1].split("EOF")[1]
    return sorted(set(re.findall(r"^\s+(?:-h, )?(--[a-z]+)", usage, re.M)))


def ps1_flags():
    text = open(os.path.join(ROOT, "install.ps1")).read()
    params = re.search(r"^param\((.*?)^\)", text, re.M | re.S).group(1)
    return sorted("--" + name.lower() for name in re.findall(r"\[(?:switch|string)\]\$([A-Za-z]+)", params))


def test_install_ps1_offers_the_same_flags_as_install_sh():
    flags = sh_flags()
    assert flags == ["--bundle", "--dev", "--firewall", "--help", "--offline", "--uninstall", "--wheelhouse"]
    assert ps1_flags() == flags
    ps1 = open(os.path.join(ROOT, "install.ps1")).read()
    for flag in flags:  # the install.sh spellings work in install.ps1 too
        assert "'%s'" % flag in ps1, flag
        assert "-%s" % flag[2:].capitalize() in ps1.split("function Show-Usage")[1].split("'@")[0], flag


def test_both_installers_read_the_pins_from_one_requirements_file_the_same_way():
    sh = open(os.path.join(ROOT, "install.sh")).read()
    ps1 = open(os.path.join(ROOT, "install.ps1")).read()
    pure = ["--only-binary=:all:", "--platform", "any", "--python-version", "3.9", "--implementation", "py",
            "--no-deps"]
    assert 'PURE_WHEELS="%s"' % " ".join(pure) in sh
    assert "$PureWheels = @(%s)" % ", ".join("'%s'" % word for word in pure) in re.sub(r"\s*\n\s*", " ", ps1)
    for text in (sh, ps1):
        assert "requirements.txt" in text and "requirements-dev.txt" in text
        assert not re.search(r"(bottle|requests|waitress|ecdsa)==", text)  # no pins of their own
        assert "--no-index" in text and "neuromesh.py firewall --uninstall" in text
        assert "-m zipapp" in text and "--no-compile" in text
    main_sh = sh.split("__main__.py\" <<'EOF'\n")[1].split("EOF")[0]
    main_ps1 = ps1.split("$Main = @'\n")[1].split("'@")[0]
    assert main_sh == main_ps1


def test_install_ps1_names_the_microsoft_store_stub():
    ps1 = open(os.path.join(ROOT, "install.ps1")).read()
    assert "*\\WindowsApps\\*" in ps1 and "Microsoft Store's placeholder" in ps1
    assert "App execution aliases" in ps1
    assert "this machine's is older" in ps1 and "pip is not available" in ps1 and "PEP 668" in ps1


def test_inside_the_bundle_messages_name_the_bundle_not_neuromesh_py(bundle, tmp_path):
    """A user who runs the .pyz (or its folder) is told commands with its own name."""
    pyz, folder = bundle
    for target in (pyz, folder):
        name = os.path.basename(target)
        shown = subprocess.run([sys.executable, "-I", target, "--help"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: python3 %s [run" % name), shown.stdout
        doctor = subprocess.run([sys.executable, "-I", target, "doctor", "--help"], capture_output=True, text=True,
                                timeout=60)
        assert "python3 %s doctor [--broadcast" % name in doctor.stdout
        for text in (shown.stdout, doctor.stdout):
            assert "neuromesh.py" not in text
