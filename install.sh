#!/bin/sh
# Install NeuroMesh's dependencies into _vendor/ beside this script.
#
#   ./install.sh          runtime packages (requirements.txt): pure-Python wheels
#                         for Python 3.9+, so _vendor/ works on any OS and can be
#                         copied onto machines with no internet
#   ./install.sh --dev    also the test packages (requirements-dev.txt), built for
#                         the Python that runs this script
#
# Environment: PYTHON=/path/to/python to choose the interpreter.
# Nothing is installed outside this folder; re-running is safe.

set -eu

usage() {
    cat <<'EOF'
Usage: ./install.sh [--dev] [--help]

Installs NeuroMesh's dependencies into _vendor/ beside this script
(nothing is installed system-wide; re-running is safe).

  --dev       also install the test tools (pytest, hypothesis, playwright,
              ollama, openai, vermin) from requirements-dev.txt, for the
              Python that runs this script
  -h, --help  show this help and exit

Environment:
  PYTHON      the Python to use (default: the first of python3, python,
              python3.14 ... python3.9 that is Python 3.9 or newer)

After installing:
  python3 neuromesh.py                        start a node
  PYTHONPATH=_vendor python3 -m pytest        run the tests (after --dev)
EOF
}

DEV=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $arg" >&2
           echo "Run ./install.sh --help for the options." >&2
           exit 2 ;;
    esac
done

die() {
    echo "install.sh: error: $*" >&2
    exit 1
}

START_DIR=$(pwd)
HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd) || die "cannot find the folder of $0"
cd "$HERE" || die "cannot enter $HERE"
[ -f requirements.txt ] || die "requirements.txt is missing from $HERE"
if [ "$DEV" = 1 ] && [ ! -f requirements-dev.txt ]; then
    die "requirements-dev.txt is missing from $HERE"
fi

# ---- find Python >= 3.9 -------------------------------------------------------
VERSION_CHECK='import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'

python_ok() {
    command -v "$1" >/dev/null 2>&1 && "$1" -c "$VERSION_CHECK" >/dev/null 2>&1
}

PY=
if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON: no such command"
    python_ok "$PYTHON" || die "PYTHON=$PYTHON does not run, or is older than Python 3.9"
    PY=$PYTHON
else
    for cand in python3 python python3.14 python3.13 python3.12 python3.11 python3.10 python3.9; do
        if python_ok "$cand"; then
            PY=$cand
            break
        fi
    done
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
PY_VERSION=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
echo "Using $PY (Python $PY_VERSION)"

# ---- pip ----------------------------------------------------------------------
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    {
        echo "install.sh: error: pip is not available for $PY (Python $PY_VERSION)."
        echo "Fix it with one of these, then run ./install.sh again:"
        if [ -f /etc/debian_version ]; then
            echo "  sudo apt install python3-pip        (Debian/Ubuntu)"
            echo "  $PY -m ensurepip --upgrade"
        elif [ -f /etc/fedora-release ] || [ -f /etc/redhat-release ]; then
            echo "  sudo dnf install python3-pip        (Fedora/RHEL)"
            echo "  $PY -m ensurepip --upgrade"
        else
            echo "  $PY -m ensurepip --upgrade"
            echo "  sudo apt install python3-pip        (Debian/Ubuntu)"
        fi
    } >&2
    exit 1
fi

# Quiet pip's notices that do not apply to an install into a folder.
PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_ROOT_USER_ACTION=ignore
export PIP_DISABLE_PIP_VERSION_CHECK PIP_ROOT_USER_ACTION

pip_failed() {
    cat >&2 <<EOF

install.sh: error: pip could not install the packages in $1 (pip's message is above).
  - The first install needs to reach PyPI. After that, copy this whole folder,
    _vendor/ included, to machines without internet: they need no install.
  - If pip says "no such option", it is too old: $PY -m pip install --user --upgrade pip
EOF
    exit 1
}

# ---- runtime packages: pure wheels for the Python 3.9 floor -------------------
echo
echo "==> Installing runtime packages (requirements.txt) into _vendor/"
"$PY" -m pip install --target _vendor --upgrade --no-warn-conflicts \
    --only-binary=:all: --platform any --python-version 3.9 --implementation py \
    --no-deps -r requirements.txt || pip_failed requirements.txt

# ---- test packages: for this interpreter --------------------------------------
if [ "$DEV" = 1 ]; then
    echo
    echo "==> Installing test packages (requirements-dev.txt) into _vendor/ for Python $PY_VERSION"
    "$PY" -m pip install --target _vendor --upgrade --no-warn-conflicts \
        -r requirements-dev.txt || pip_failed requirements-dev.txt
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
