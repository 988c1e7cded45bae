<#
.SYNOPSIS
    Installs NeuroMesh's dependencies into _vendor\ beside this script, or builds the one-file bundle.

.DESCRIPTION
    Installs the runtime packages of requirements.txt into _vendor\ as pure-Python
    wheels for Python 3.9+, so the folder works on any OS and can be copied onto
    machines with no internet. Nothing is installed system-wide; re-running is safe.
    Offers the same options as install.sh (tests/e2e/test_airgap.py keeps them in step).

    The Python used is $env:PYTHON if set, else the first of `py -3`, `python`,
    `python3` that is Python 3.9 or newer.

.PARAMETER Dev
    Also install the test tools of requirements-dev.txt (pytest, hypothesis,
    playwright, ollama, openai, vermin) for the Python that runs the install.

.PARAMETER Bundle
    Build dist\neuromesh-<version>.pyz, one file that runs with
    `py -3 neuromesh-<version>.pyz` on any machine with Python 3.9+ and nothing
    installed, and dist\neuromesh-<version>\, the same as a folder.

.PARAMETER Wheelhouse
    On a connected machine: download the pinned wheels into this folder.

.PARAMETER Offline
    On a machine without internet: install (or -Bundle) from the wheels in this folder.

.PARAMETER Firewall
    After installing, open UDP 5000 and TCP 7878 and 8080 for the local subnet only
    (rules in the NeuroMesh group; shows the commands and asks first).

.PARAMETER Uninstall
    Remove the firewall rules that -Firewall added.

.PARAMETER Help
    Show this help and exit.

.EXAMPLE
    .\install.ps1; py -3 neuromesh.py

.EXAMPLE
    .\install.ps1 -Dev; $env:PYTHONPATH = "_vendor"; py -3 -m pytest
#>
# Not positional: `.\install.ps1 --dev` must not become -Offline '--dev'.
[CmdletBinding(PositionalBinding = $false)]
param(
    [switch]$Dev,
    [switch]$Bundle,
    [string]$Offline = '',
    [string]$Wheelhouse = '',
    [switch]$Firewall,
    [switch]$Uninstall,
    [switch]$Help,
    # The spellings of install.sh (--dev, --offline DIR, ...) arrive here.
    [Parameter(ValueFromRemainingArguments = $true)][string[]]$Rest = @()
)

# Native commands report failure through $LASTEXITCODE, checked after each call.
# (Not 'Stop': Windows PowerShell 5.1 turns a native command's redirected stderr into errors.)
$ErrorActionPreference = 'Continue'

function Show-Usage {
    Write-Host @'
Usage: .\install.ps1 [-Dev] [-Bundle] [-Offline DIR | -Wheelhouse DIR]
                     [-Firewall | -Uninstall] [-Help]

Installs NeuroMesh's dependencies into _vendor\ beside this script
(nothing is installed system-wide; re-running is safe).

  -Dev             also install the test tools (pytest, hypothesis, playwright,
                   ollama, openai, vermin) from requirements-dev.txt, for the
                   Python that runs this script
  -Bundle          build dist\neuromesh-<version>.pyz, one file that runs with
                   `py -3 neuromesh-<version>.pyz` on any machine with Python 3.9+
                   and nothing installed, and dist\neuromesh-<version>\, the same
                   as a folder (run it with `py -3 neuromesh-<version>`)
  -Wheelhouse DIR  on a connected machine: download the pinned wheels into DIR
                   (with -Dev, the test tools' too, for this Python)
  -Offline DIR     on a machine without internet: install (or -Bundle) from the
                   wheels in DIR instead of PyPI
  -Firewall        after installing, open UDP 5000 and TCP 7878 and 8080 for the
                   local subnet only, in the firewall group NeuroMesh (shows the
                   commands and asks first; run PowerShell as Administrator;
                   other ports: $env:NEUROMESH_HTTP_PORT = 9090 first)
  -Uninstall       remove the firewall rules that -Firewall added (delete the
                   folder yourself to remove NeuroMesh)
  -Help            show this help and exit

Environment:
  PYTHON  the Python to use (default: the first of py -3, python, python3
          that is Python 3.9 or newer)

After installing:
  py -3 neuromesh.py                                  start a node
  py -3 neuromesh.py doctor                           check why peers do not appear
  $env:PYTHONPATH = "_vendor"; py -3 -m pytest        run the tests (after -Dev)
'@
}

# The spellings of install.sh work too.
$given = @($Rest)
for ($i = 0; $i -lt $given.Count; $i++) {
    $arg = "$($given[$i])"
    switch -CaseSensitive ($arg) {
        '--dev' { $Dev = [switch]$true }
        '--bundle' { $Bundle = [switch]$true }
        '--firewall' { $Firewall = [switch]$true }
        '--uninstall' { $Uninstall = [switch]$true }
        '--help' { $Help = [switch]$true }
        { $_ -in @('--offline', '--wheelhouse') } {
            if ($i + 1 -ge $given.Count) {
                Write-Host "install.ps1: $arg needs a folder: .\install.ps1 $arg DIR" -ForegroundColor Red
                exit 2
            }
            $i++
            if ($arg -eq '--offline') { $Offline = "$($given[$i])" } else { $Wheelhouse = "$($given[$i])" }
        }
        default {
            Write-Host "install.ps1: unknown option: $arg" -ForegroundColor Red
            Write-Host "Run .\install.ps1 -Help for the options."
            exit 2
        }
    }
}
if ($Help) { Show-Usage; exit 0 }

$Here = $PSScriptRoot
if (-not $Here) { $Here = Split-Path -Parent $MyInvocation.MyCommand.Path }
$StartDir = (Get-Location).Path
# Folders given relative to where the user stands.
if ($Offline) { $Offline = [System.IO.Path]::GetFullPath((Join-Path $StartDir $Offline)) }
if ($Wheelhouse) { $Wheelhouse = [System.IO.Path]::GetFullPath((Join-Path $StartDir $Wheelhouse)) }
Push-Location -LiteralPath $Here

function Stop-Install([string]$Message) {
    Write-Host "install.ps1: error: $Message" -ForegroundColor Red
    Pop-Location
    exit 1
}

if ($Offline -and $Wheelhouse) { Stop-Install "-Offline and -Wheelhouse go on different machines: give one" }
if ($Firewall -and $Uninstall) { Stop-Install "-Firewall and -Uninstall: give one" }
if (-not (Test-Path -LiteralPath 'requirements.txt')) { Stop-Install "requirements.txt is missing from $Here" }
if ($Dev -and -not (Test-Path -LiteralPath 'requirements-dev.txt')) { Stop-Install "requirements-dev.txt is missing from $Here" }
if ($Offline -and -not (Test-Path -LiteralPath $Offline -PathType Container)) {
    Stop-Install "-Offline $($Offline): no such folder. Fill one on a connected machine with .\install.ps1 -Wheelhouse DIR and copy DIR here."
}

# ---- find Python >= 3.9 -------------------------------------------------------
# A candidate is an array: the program, then the arguments that come before ours.
$VersionCode = 'import sys; print("%d %d %d" % sys.version_info[:3])'
$script:TooOld = @()
$script:StoreStub = $false
$script:CandVersion = ''

function Test-InWindowsApps([string]$Exe) {
    # The Microsoft Store's python.exe placeholder lives in WindowsApps and only opens the Store
    # (a Python installed from the Store lives there too, but runs).
    $found = Get-Command $Exe -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
    return ($found -and $found.Source -like '*\WindowsApps\*')
}

function Test-Python([string[]]$Cmd) {
    if (-not (Get-Command $Cmd[0] -CommandType Application -ErrorAction SilentlyContinue)) { return $false }
    $exe = $Cmd[0]
    $pre = @($Cmd | Select-Object -Skip 1)
    $out = & $exe @pre -c $VersionCode 2>$null
    if ($LASTEXITCODE -ne 0 -or -not $out) {
        if (Test-InWindowsApps $exe) { $script:StoreStub = $true }
        return $false
    }
    $parts = "$out".Trim().Split(' ')
    if ($parts.Count -ne 3) { return $false }
    $script:CandVersion = $parts -join '.'
    if ([int]$parts[0] -gt 3 -or ([int]$parts[0] -eq 3 -and [int]$parts[1] -ge 9)) { return $true }
    $script:TooOld += "  $($Cmd -join ' ') is Python $($script:CandVersion)"
    return $false
}

$Py = $null
if ($env:PYTHON) {
    if (-not (Get-Command $env:PYTHON -CommandType Application -ErrorAction SilentlyContinue)) {
        Stop-Install "PYTHON=$($env:PYTHON): no such program"
    }
    if (-not (Test-Python @($env:PYTHON))) {
        Stop-Install "PYTHON=$($env:PYTHON) does not run, or is older than Python 3.9 $($script:TooOld -join ' ')"
    }
    $Py = @($env:PYTHON)
} else {
    foreach ($cand in @(@('py', '-3'), @('python'), @('python3'))) {
        if (Test-Python $cand) { $Py = $cand; break }
    }
}
if (-not $Py -and $script:TooOld.Count -gt 0) {
    Write-Host "install.ps1: error: NeuroMesh needs Python 3.9 or newer, and this machine's is older:" -ForegroundColor Red
    $script:TooOld | ForEach-Object { Write-Host $_ }
    Write-Host "Install a newer one from https://www.python.org/downloads/ (or: winget install Python.Python.3.12),"
    Write-Host "then open a new PowerShell window and run .\install.ps1 again."
    Pop-Location
    exit 1
}
if (-not $Py -and $script:StoreStub) {
    Write-Host @'
install.ps1: error: "python" here is the Microsoft Store's placeholder, not Python
(it only opens the Store). Install Python 3 from https://www.python.org/downloads/
(tick "Add python.exe to PATH"), or: winget install Python.Python.3.12
and, if `python` still opens the Store, turn its alias off: Settings > Apps >
Advanced app settings > App execution aliases > python.exe and python3.exe: Off.
Then open a new PowerShell window and run .\install.ps1 again.
'@ -ForegroundColor Red
    Pop-Location
    exit 1
}
if (-not $Py) {
    Write-Host @'
install.ps1: error: NeuroMesh needs Python 3.9 or newer, and none was found
(tried py -3, python, python3).
Install Python 3 from https://www.python.org/downloads/ (tick "Add python.exe to PATH"),
or: winget install Python.Python.3.12
then open a new PowerShell window and run .\install.ps1 again,
or name one explicitly: $env:PYTHON = "C:\path\to\python.exe"; .\install.ps1
'@ -ForegroundColor Red
    Pop-Location
    exit 1
}
$PyExe = $Py[0]
$PyPre = @($Py | Select-Object -Skip 1)
$PyText = $Py -join ' '
$PyVersion = $script:CandVersion
Write-Host "Using $PyText (Python $PyVersion)"

# ---- the firewall rules only --------------------------------------------------
if ($Uninstall) {
    & $PyExe @PyPre neuromesh.py firewall --uninstall
    $code = $LASTEXITCODE
    Pop-Location
    exit $code
}

# ---- pip ----------------------------------------------------------------------
# PEP 668 marks an OS-managed Python (not found on Windows; kept in step with install.sh).
& $PyExe @PyPre -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' 2>$null | Out-Null
$ExternallyManaged = ($LASTEXITCODE -eq 0)

& $PyExe @PyPre -m pip --version 2>$null | Out-Null
if ($LASTEXITCODE -ne 0) {
    Write-Host "install.ps1: error: pip is not available for $PyText (Python $PyVersion)." -ForegroundColor Red
    Write-Host "Fix it with this command, then run .\install.ps1 again:"
    Write-Host "  $PyText -m ensurepip --upgrade"
    Write-Host "(or reinstall Python from python.org with the 'pip' option ticked)"
    Write-Host "No pip at all on an air-gapped machine? Build the one-file bundle on a connected one"
    Write-Host "(.\install.ps1 -Bundle) and copy dist\neuromesh-<version>.pyz: it needs no install."
    Pop-Location
    exit 1
}

$env:PIP_DISABLE_PIP_VERSION_CHECK = '1'

function Invoke-Pip([string]$Verb, [string]$ReqFile, [string[]]$PipArgs) {
    & $PyExe @PyPre -m pip $Verb @PipArgs -r $ReqFile
    if ($LASTEXITCODE -ne 0) {
        Write-Host ""
        Write-Host "install.ps1: error: pip could not $Verb the packages in $ReqFile (pip's message is above)." -ForegroundColor Red
        if ($Offline) {
            Write-Host "  - -Offline $Offline lacks a wheel: fill the folder again on a connected machine"
            Write-Host "    with .\install.ps1 -Wheelhouse DIR (add -Dev for the test tools, from the same Python version)."
        } else {
            Write-Host "  - This step needs to reach PyPI. After that, copy this whole folder, _vendor\"
            Write-Host "    included, to machines without internet (or use -Wheelhouse / -Offline, or -Bundle)."
        }
        if ($ExternallyManaged) {
            Write-Host "  - $PyText is managed by the OS (PEP 668): use a venv: $PyText -m venv venv; `$env:PYTHON = 'venv\Scripts\python.exe'"
        }
        Write-Host "  - If pip says 'no such option', it is too old: $PyText -m pip install --user --upgrade pip"
        Pop-Location
        exit 1
    }
}

# Where wheels come from: PyPI, or the -Offline folder only.
$IndexArgs = @()
if ($Offline) { $IndexArgs = @('--no-index', '--find-links', $Offline) }
# The runtime wheels: pure Python for the 3.9 floor, so they fit every OS and CPython >= 3.9.
$PureWheels = @('--only-binary=:all:', '--platform', 'any', '--python-version', '3.9',
    '--implementation', 'py', '--no-deps')

# ---- -Wheelhouse: download only -----------------------------------------------
if ($Wheelhouse) {
    New-Item -ItemType Directory -Force -Path $Wheelhouse | Out-Null
    Write-Host ""
    Write-Host "==> Downloading the runtime wheels (requirements.txt) into $Wheelhouse"
    Invoke-Pip 'download' 'requirements.txt' (@('--dest', $Wheelhouse) + $PureWheels)
    if ($Dev) {
        Write-Host ""
        Write-Host "==> Downloading the test tools (requirements-dev.txt) for Python $PyVersion into $Wheelhouse"
        Invoke-Pip 'download' 'requirements-dev.txt' @('--dest', $Wheelhouse)
    }
    Copy-Item -LiteralPath 'requirements.txt' -Destination $Wheelhouse
    $devFlag = ''
    if ($Dev) { $devFlag = ' -Dev' }
    Write-Host ""
    Write-Host "Done: copy $Wheelhouse and this folder to the machine without internet, then run"
    Write-Host "  .\install.ps1 -Offline $(Split-Path -Leaf $Wheelhouse)$devFlag"
    Pop-Location
    exit 0
}

# ---- -Bundle: dist\neuromesh-<version>.pyz and dist\neuromesh-<version>\ ------
if ($Bundle) {
    $Version = (& $PyExe @PyPre -c 'import re; print(re.search(r"^__version__ = \"([^\"]+)\"", open("neuromesh.py", encoding="utf-8").read(), re.M).group(1))')
    if ($LASTEXITCODE -ne 0 -or -not $Version) { Stop-Install "cannot read __version__ from neuromesh.py" }
    $Name = "neuromesh-$("$Version".Trim())"
    $Stage = Join-Path 'dist' $Name
    Write-Host ""
    Write-Host "==> Building dist\$Name.pyz and dist\$Name\"
    if (Test-Path -LiteralPath $Stage) { Remove-Item -Recurse -Force -LiteralPath $Stage }
    if (Test-Path -LiteralPath "$Stage.pyz") { Remove-Item -Force -LiteralPath "$Stage.pyz" }
    New-Item -ItemType Directory -Force -Path $Stage | Out-Null
    Invoke-Pip 'install' 'requirements.txt' (@('--target', $Stage, '--no-compile', '--no-warn-conflicts') + $IndexArgs + $PureWheels)
    if (Test-Path -LiteralPath (Join-Path $Stage 'bin')) { Remove-Item -Recurse -Force -LiteralPath (Join-Path $Stage 'bin') }
    Copy-Item -LiteralPath 'neuromesh.py' -Destination $Stage
    Copy-Item -Recurse -LiteralPath 'neuromesh_static' -Destination $Stage
    $Main = @'
"""NeuroMesh in one file: python neuromesh-<version>.pyz [options] (see README.md)."""
import sys

sys.dont_write_bytecode = True  # nothing is written beside the bundle, only in the data dir
import neuromesh  # noqa: E402

sys.exit(neuromesh.main())
'@
    [System.IO.File]::WriteAllText((Join-Path (Resolve-Path $Stage) '__main__.py'), $Main.Replace("`r`n", "`n") + "`n")
    Get-ChildItem -LiteralPath $Stage -Recurse -Directory -Filter '__pycache__' | Remove-Item -Recurse -Force
    & $PyExe @PyPre -m zipapp $Stage --output "$Stage.pyz" --python "/usr/bin/env python3" --compress
    if ($LASTEXITCODE -ne 0) { Stop-Install "python -m zipapp could not build $Stage.pyz" }
    Write-Host ""
    Write-Host "Done: $(Join-Path $Here "$Stage.pyz") and $(Join-Path $Here $Stage)\"
    Write-Host "Copy either to any machine with Python 3.9+ and run:  py -3 $Name.pyz"
    Pop-Location
    exit 0
}

# ---- runtime packages: pure wheels for the Python 3.9 floor -------------------
Write-Host ""
Write-Host "==> Installing runtime packages (requirements.txt) into _vendor\"
Invoke-Pip 'install' 'requirements.txt' (@('--target', '_vendor', '--upgrade', '--no-warn-conflicts') + $IndexArgs + $PureWheels)

# ---- test packages: for this interpreter --------------------------------------
if ($Dev) {
    Write-Host ""
    Write-Host "==> Installing test packages (requirements-dev.txt) into _vendor\ for Python $PyVersion"
    Invoke-Pip 'install' 'requirements-dev.txt' (@('--target', '_vendor', '--upgrade', '--no-warn-conflicts') + $IndexArgs)
}

# ---- what next ----------------------------------------------------------------
$Prefix = ''
if ($StartDir -ne $Here) { $Prefix = "cd '$Here'; " }
Write-Host ""
Write-Host "Done: dependencies are in $(Join-Path $Here '_vendor')"
Write-Host "Start a node:   $Prefix$PyText neuromesh.py"
if ($Dev) {
    Write-Host "Run the tests:  $Prefix`$env:PYTHONPATH = `"_vendor`"; $PyText -m pytest"
}

# ---- firewall, with consent ---------------------------------------------------
if ($Firewall) {
    Write-Host ""
    Write-Host "==> Opening the firewall for NeuroMesh (local subnet only)"
    & $PyExe @PyPre neuromesh.py firewall
    $code = $LASTEXITCODE
    Pop-Location
    exit $code
}
Pop-Location
exit 0
