"""The command line a new user meets. Messages say `python3` (stock Debian and
Ubuntu have no `python`), the top-level help keeps each command's sentence whole, an unknown option
is named with the close one, and a machine before install is told to run ./install.sh."""

import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT, SCRIPT
from support.cli import closed_port


def run(*args, script=SCRIPT, python=(sys.executable,), cwd=ROOT):
    return subprocess.run(list(python) + [script] + list(args), capture_output=True, text=True, timeout=60, cwd=cwd)


def test_every_command_shown_says_python3():
    texts = [run("--help").stdout] + [run(command, "--help").stdout
                                      for command in ("run", "export", "import", "doctor", "status", "firewall")]
    texts.append(run("status", "--http-port", str(closed_port())).stderr)
    texts.append(run("export").stderr)
    texts.append(run("--http-port", "x").stderr)
    for text in texts:
        assert "python3 neuromesh.py" in text, text
        assert not re.search(r"(?<![\w-])python neuromesh", text), text


def test_the_top_level_help_keeps_each_commands_sentence_whole():
    help_text = " ".join(run("--help").stdout.split())
    assert "firewall open this node's ports (UDP 5000, TCP 7878 and 8080, or the ones configured) for the local " \
           "subnet only; shows the commands and asks first." in help_text
    assert "import read conversations from DIR (the original NeuroMesh's files, or an export) into this node." \
        in help_text


def test_a_misspelt_option_is_named_with_the_close_one():
    result = run("--htpp-port", "8081")
    assert result.returncode == 2
    assert "unknown option --htpp-port (did you mean --http-port?)" in result.stderr
    assert "invalid choice" not in result.stderr and "Run `python3 neuromesh.py --help`" in result.stderr
    after_command = run("doctor", "--mesh-kye=abc")
    assert after_command.returncode == 2 and "unknown option --mesh-kye (did you mean --mesh-key?)" in after_command.stderr
    nothing_close = run("--zzzzzz")
    assert nothing_close.returncode == 2 and "unknown option --zzzzzz." in nothing_close.stderr


def test_known_options_and_their_prefixes_still_pass():
    assert run("--version").returncode == 0
    assert run("--vers").returncode == 0  # argparse's unique prefixes keep working


def test_before_install_the_help_says_to_run_install_sh_not_pip(tmp_path):
    shutil.copy2(SCRIPT, str(tmp_path))
    result = run("--help", script=os.path.join(str(tmp_path), "neuromesh.py"), python=(sys.executable, "-I", "-S"),
                 cwd=str(tmp_path))
    assert result.returncode != 0
    assert "./install.sh" in result.stderr and str(tmp_path) in result.stderr
    assert "pip install" not in result.stderr and "Traceback" not in result.stderr
