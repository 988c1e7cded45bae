#!/bin/sh
# Install NeuroMesh's dependencies into _vendor/ beside this script, or build the one-file bundle.
#
#   ./install.sh                  runtime packages (requirements.txt): pure-Python wheels
#                                 for Python 3.9+, so _vendor/ works on any OS and can be
#                                 copied onto machines with no internet
#   ./install.sh --dev            also the test packages (requirements-dev.txt), built for
#                                 the Python that runs this script
#   ./install.sh --bundle         dist/neuromesh-<version>.pyz (one file) and its folder
#   ./install.sh --wheelhouse DIR / --offline DIR   carry the wheels to an air-gapped machine
#   ./install.sh --firewall / --uninstall           open / close the ports for the local subnet
#
# Environment: PYTHON=/path/to/python to choose the interpreter.
# Nothing is installed outside this folder; re-running is safe. install.ps1 offers the same
# flags (tests/e2e/test_airgap.py keeps the two in step).

set -eu

usage() {
    cat <<'EOF'
Usage: ./install.sh [--dev] [--bundle] [--offline DIR | --wheelhouse DIR]
                    [--firewall | --uninstall] [--help]

Installs NeuroMesh's dependencies into _vendor/ beside this script
(nothing is installed system-wide; re-running is safe).

  --dev             also install the test tools (pytest, hypothesis, playwright,
                    ollama, openai, vermin) from requirements-dev.txt, for the
                    Python that runs this script
  --bundle          build dist/neuromesh-<version>.pyz, one file that runs with
                    `python3 neuromesh-<version>.pyz` on any machine with Python 3.9+
                    and nothing installed, and dist/neuromesh-<version>/, the same
                    as a folder (run it with `python3 neuromesh-<version>`)
  --wheelhouse DIR  on a connected machine: download the pinned wheels into DIR
                    (with --dev, the test tools' too, for this Python)
  --offline DIR     on a machine without internet: install (or --bundle) from the
                    wheels in DIR instead of PyPI
  --firewall        after installing, open UDP 5000 and TCP 7878 and 8080 for the
                    local subnet only (shows the commands and asks first; other
                    ports: NEUROMESH_HTTP_PORT=9090 ./install.sh --firewall)
  --uninstall       remove the firewall rules that --firewall added (delete the
                    folder yourself to remove NeuroMesh)
  -h, --help        show this help and exit

Environment:
  PYTHON      the Python to use (default: the first of python3, python,
              python3.14 ... python3.9 that is Python 3.9 or newer)

After installing:
  python3 neuromesh.py                        start a node
  python3 neuromesh.py doctor                 check why peers do not appear
  PYTHONPATH=_vendor python3 -m pytest        run the tests (after --dev)
EOF
}

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

DEV=0
BUNDLE=0
FIREWALL=0
UNINSTALL=0
OFFLINE=
WHEELHOUSE=
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) DEV=1 ;;
        --bundle) BUNDLE=1 ;;
        --firewall) FIREWALL=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --offline|--wheelhouse)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a folder: ./install.sh $1 DIR"
            if [ "$1" = --offline ]; then OFFLINE=$2; else WHEELHOUSE=$2; fi
            shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $1" >&2
           echo "Run ./install.sh --help for the options." >&2
           exit 2 ;;
    esac
    shift
done
[ -z "$OFFLINE" ] || [ -z "$WHEELHOUSE" ] || die "--offline and --wheelhouse go on different machines: give one"
[ "$FIREWALL" = 0 ] || [ "$UNINSTALL" = 0 ] || die "--firewall and --uninstall: give one"

START_DIR=$(pwd)
# Folders given relative to where the user stands.
case "$OFFLINE" in ''|/*) ;; *) OFFLINE="$START_DIR/$OFFLINE" ;; esac
case "$WHEELHOUSE" in ''|/*) ;; *) WHEELHOUSE="$START_DIR/$WHEELHOUSE" ;; esac
HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || die "cannot find the folder of $0"
cd "$HERE" || die "cannot enter $HERE"
[ -f requirements.txt ] || die "requirements.txt is missing from $HERE"
if [ "$DEV" = 1 ] && [ ! -f requirements-dev.txt ]; then
    die "requirements-dev.txt is missing from $HERE"
fi
if [ -n "$OFFLINE" ] && [ ! -d "$OFFLINE" ]; then
    die "--offline $OFFLINE: no such folder. Fill one on a connected machine with
  ./install.sh --wheelhouse DIR   and copy DIR here."
fi

# ---- find Python >= 3.9 -------------------------------------------------------
VERSION_CODE='import sys; print("%d %d %d" % sys.version_info[:3])'
TOO_OLD=

# Sets CAND_VERSION; true when $1 runs and is Python 3.9 or newer.
python_ok() {
    command -v "$1" >/dev/null 2>&1 || return 1
    CAND_VERSION=$("$1" -c "$VERSION_CODE" 2>/dev/null) || return 1
    set -- "$1" $CAND_VERSION
    [ $# -eq 4 ] || return 1
    if [ "$2" -gt 3 ] || { [ "$2" -eq 3 ] && [ "$3" -ge 9 ]; }; then
        return 0
    fi
    TOO_OLD="${TOO_OLD}  $1 is Python $2.$3.$4
"
    return 1
}

PY=
if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON: no such command"
    python_ok "$PYTHON" || die "PYTHON=$PYTHON does not run, or is older than Python 3.9${TOO_OLD:+ (
$TOO_OLD)}"
    PY=$PYTHON
else
    for cand in python3 python python3.14 python3.13 python3.12 python3.11 python3.10 python3.9; do
        if python_ok "$cand"; then
            PY=$cand
            break
        fi
    done
fi
if [ -z "$PY" ] && [ -n "$TOO_OLD" ]; then
    {
        echo "install.sh: error: NeuroMesh needs Python 3.9 or newer, and this machine's is older:"
        printf '%s' "$TOO_OLD"
        echo "Install a newer one (python.org, or: sudo apt install python3.11 / brew install python),"
        echo "then run ./install.sh again, or name it: PYTHON=/path/to/python3.11 ./install.sh"
    } >&2
    exit 1
fi
if [ -z "$PY" ]; then
    cat >&2 <<'EOF'
install.sh: error: NeuroMesh needs Python 3.9 or newer, and none was found
(tried python3, python, python3.14 ... python3.9).
Install it, for example:
  Debian/Ubuntu:  sudo apt install python3 python3-pip
  Fedora:         sudo dnf install python3 python3-pip
  macOS:          install Python 3 from python.org (or: brew install python)
or name one explicitly:  PYTHON=/path/to/python3 ./install.sh
EOF
    exit 1
fi
PY_VERSION=$(echo $CAND_VERSION | tr ' ' '.')
echo "Using $PY (Python $PY_VERSION)"

# ---- the firewall rules only --------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    exec "$PY" neuromesh.py firewall --uninstall
fi

# ---- pip ----------------------------------------------------------------------
# PEP 668: the OS's own Python refuses `pip install` outside a venv; into a folder is allowed.
EXTERNALLY_MANAGED=0
if "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' >/dev/null 2>&1; then
    EXTERNALLY_MANAGED=1
fi

if ! "$PY" -m pip --version >/dev/null 2>&1; then
    {
        echo "install.sh: error: pip is not available for $PY (Python $PY_VERSION)."
        echo "Fix it with one of these, then run ./install.sh again:"
        if [ "$EXTERNALLY_MANAGED" = 1 ]; then
            echo "  $PY is the system's Python, managed by the OS (PEP 668), where ensurepip is off:"
            echo "  sudo apt install python3-pip        (Debian/Ubuntu; install.sh only ever installs into _vendor/)"
            echo "  sudo dnf install python3-pip        (Fedora/RHEL)"
        elif [ -f /etc/debian_version ]; then
            echo "  sudo apt install python3-pip        (Debian/Ubuntu)"
            echo "  $PY -m ensurepip --upgrade"
        elif [ -f /etc/fedora-release ] || [ -f /etc/redhat-release ]; then
            echo "  sudo dnf install python3-pip        (Fedora/RHEL)"
            echo "  $PY -m ensurepip --upgrade"
        else
            echo "  $PY -m ensurepip --upgrade"
            echo "  sudo apt install python3-pip        (Debian/Ubuntu)"
        fi
        echo "No pip at all on an air-gapped machine? Build the one-file bundle on a connected one"
        echo "(./install.sh --bundle) and copy dist/neuromesh-<version>.pyz: it needs no install."
    } >&2
    exit 1
fi

# Quiet pip's notices that do not apply to an install into a folder.
PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK PIP_ROOT_USER_ACTION

pip_failed() {
    {
        echo
        echo "install.sh: error: pip could not $2 the packages in $1 (pip's message is above)."
        if [ -n "$OFFLINE" ]; then
            echo "  - --offline $OFFLINE lacks a wheel: fill the folder again on a connected machine"
            echo "    with ./install.sh --wheelhouse DIR (add --dev for the test tools, from the same Python version)."
        else
            echo "  - This step needs to reach PyPI. After that, copy this whole folder, _vendor/"
            echo "    included, to machines without internet (or use --wheelhouse / --offline, or --bundle)."
        fi
        if [ "$EXTERNALLY_MANAGED" = 1 ]; then
            echo "  - $PY is managed by the OS (PEP 668): install.sh installs into a folder, which it allows;"
            echo "    if pip still says externally-managed-environment, use a venv:"
            echo "    $PY -m venv ~/.neuromesh-venv && PYTHON=~/.neuromesh-venv/bin/python ./install.sh"
        fi
        echo "  - If pip says \"no such option\", it is too old: $PY -m pip install --user --upgrade pip"
    } >&2
    exit 1
}

# Where wheels come from: PyPI, or the --offline folder only.
if [ -n "$OFFLINE" ]; then
    set -- --no-index --find-links "$OFFLINE"
else
    set --
fi
# The runtime wheels: pure Python for the 3.9 floor, so they fit every OS and CPython >= 3.9.
PURE_WHEELS="--only-binary=:all: --platform any --python-version 3.9 --implementation py --no-deps"

# ---- --wheelhouse: download only ----------------------------------------------
if [ -n "$WHEELHOUSE" ]; then
    mkdir -p "$WHEELHOUSE" || die "cannot create $WHEELHOUSE"
    echo
    echo "==> Downloading the runtime wheels (requirements.txt) into $WHEELHOUSE"
    # shellcheck disable=SC2086
    "$PY" -m pip download --dest "$WHEELHOUSE" $PURE_WHEELS -r requirements.txt \
        || pip_failed requirements.txt download
    if [ "$DEV" = 1 ]; then
        echo
        echo "==> Downloading the test tools (requirements-dev.txt) for Python $PY_VERSION into $WHEELHOUSE"
        "$PY" -m pip download --dest "$WHEELHOUSE" -r requirements-dev.txt \
            || pip_failed requirements-dev.txt download
    fi
    cp requirements.txt "$WHEELHOUSE/"
    echo
    echo "Done: copy $WHEELHOUSE and this folder to the machine without internet, then run"
    echo "  ./install.sh --offline $(basename "$WHEELHOUSE")$( [ "$DEV" = 1 ] && echo ' --dev')"
    exit 0
fi

# ---- --bundle: dist/neuromesh-<version>.pyz and dist/neuromesh-<version>/ -----
if [ "$BUNDLE" = 1 ]; then
    VERSION=$("$PY" -c 'import re; print(re.search(r"^__version__ = \"([^\"]+)\"", open("neuromesh.py", encoding="utf-8").read(), re.M).group(1))') \
        || die "cannot read __version__ from neuromesh.py"
    NAME="neuromesh-$VERSION"
    echo
    echo "==> Building dist/$NAME.pyz and dist/$NAME/"
    rm -rf "dist/$NAME" "dist/$NAME.pyz"
    mkdir -p "dist/$NAME"
    # shellcheck disable=SC2086
    "$PY" -m pip install --target "dist/$NAME" --no-compile --no-warn-conflicts "$@" $PURE_WHEELS \
        -r requirements.txt || pip_failed requirements.txt install
    rm -rf "dist/$NAME/bin"
    cp neuromesh.py "dist/$NAME/"
    cp -R neuromesh_static "dist/$NAME/"
    cat > "dist/$NAME/__main__.py" <<'EOF'
"""NeuroMesh in one file: python neuromesh-<version>.pyz [options] (see README.md)."""
import sys

sys.dont_write_bytecode = True  # nothing is written beside the bundle, only in the data dir
import neuromesh  # noqa: E402

sys.exit(neuromesh.main())
EOF
    find "dist/$NAME" -name __pycache__ -type d -prune -exec rm -rf {} +
    "$PY" -m zipapp "dist/$NAME" --output "dist/$NAME.pyz" --python "/usr/bin/env python3" --compress \
        || die "python -m zipapp could not build dist/$NAME.pyz"
    echo
    echo "Done: $HERE/dist/$NAME.pyz ($(wc -c < "dist/$NAME.pyz" | tr -d ' ') bytes) and $HERE/dist/$NAME/"
    echo "Copy either to any machine with Python 3.9+ and run:  python3 $NAME.pyz"
    exit 0
fi

# ---- runtime packages: pure wheels for the Python 3.9 floor -------------------
echo
echo "==> Installing runtime packages (requirements.txt) into _vendor/${OFFLINE:+ from $OFFLINE}"
# shellcheck disable=SC2086
"$PY" -m pip install --target _vendor --upgrade --no-warn-conflicts "$@" $PURE_WHEELS \
    -r requirements.txt || pip_failed requirements.txt install

# ---- test packages: for this interpreter --------------------------------------
if [ "$DEV" = 1 ]; then
    echo
    echo "==> Installing test packages (requirements-dev.txt) into _vendor/ for Python $PY_VERSION"
    "$PY" -m pip install --target _vendor --upgrade --no-warn-conflicts "$@" \
        -r requirements-dev.txt || pip_failed requirements-dev.txt install
fi

# ---- what next ----------------------------------------------------------------
PREFIX=
if [ "$START_DIR" != "$HERE" ]; then
    PREFIX="cd '$HERE' && "
fi
echo
echo "Done: dependencies are in $HERE/_vendor"
echo "Start a node:   ${PREFIX}$PY neuromesh.py"
if [ "$DEV" = 1 ]; then
    echo "Run the tests:  ${PREFIX}PYTHONPATH=_vendor $PY -m pytest"
fi

# ---- firewall, with consent ---------------------------------------------------
if [ "$FIREWALL" = 1 ]; then
    echo
    echo "==> Opening the firewall for NeuroMesh (local subnet only)"
    "$PY" neuromesh.py firewall
fi
