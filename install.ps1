<#
.SYNOPSIS
    Installs NeuroMesh's dependencies into _vendor\ beside this script.

.DESCRIPTION
    Installs the runtime packages of requirements.txt into _vendor\ as pure-Python
    wheels for Python 3.9+, so the folder works on any OS and can be copied onto
    machines with no internet. Nothing is installed system-wide; re-running is safe.

    The Python used is $env:PYTHON if set, else the first of `py -3`, `python`,
    `python3` that is Python 3.9 or newer.

.PARAMETER Dev
    Also install the test tools of requirements-dev.txt (pytest, hypothesis,
    playwright, ollama, openai, vermin) for the Python that runs the install.

.PARAMETER Help
    Show this help and exit.

.EXAMPLE
    .\install.ps1; py -3 neuromesh.py

.EXAMPLE
    .\install.ps1 -Dev; $env:PYTHONPATH = "_vendor"; py -3 -m pytest
#>
param(
    [switch]$Dev,
    [switch]$Help
)

# Native commands report failure through $LASTEXITCODE, checked after each call.
# (Not 'Stop': Windows PowerShell 5.1 turns a native command's redirected stderr into errors.)
$ErrorActionPreference = 'Continue'

function Show-Usage {
    Write-Host @'
Usage: .\install.ps1 [-Dev] [-Help]

Installs NeuroMesh's dependencies into _vendor\ beside this script
(nothing is installed system-wide; re-running is safe).

  -Dev    also install the test tools (pytest, hypothesis, playwright,
          ollama, openai, vermin) from requirements-dev.txt, for the
          Python that runs this script
  -Help   show this help and exit

Environment:
  PYTHON  the Python to use (default: the first of py -3, python, python3
          that is Python 3.9 or newer)

After installing:
  py -3 neuromesh.py                                  start a node
  $env:PYTHONPATH = "_vendor"; py -3 -m pytest        run the tests (after -Dev)
'@
}

# The spellings of install.sh work too.
foreach ($arg in $args) {
    switch -CaseSensitive ("$arg") {
        '--dev' { $Dev = [switch]$true }
        '--help' { $Help = [switch]$true }
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
Push-Location -LiteralPath $Here

function Stop-Install([string]$Message) {
    Write-Host "install.ps1: error: $Message" -ForegroundColor Red
    Pop-Location
    exit 1
}

if (-not (Test-Path -LiteralPath 'requirements.txt')) { Stop-Install "requirements.txt is missing from $Here" }
if ($Dev -and -not (Test-Path -LiteralPath 'requirements-dev.txt')) { Stop-Install "requirements-dev.txt is missing from $Here" }

# ---- find Python >= 3.9 -------------------------------------------------------
# A candidate is an array: the program, then the arguments that come before ours.
$VersionCheck = 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'

function Test-Python([string[]]$Cmd) {
    if (-not (Get-Command $Cmd[0] -CommandType Application -ErrorAction SilentlyContinue)) { return $false }
    $exe = $Cmd[0]
    $pre = @($Cmd | Select-Object -Skip 1)
    # The Microsoft Store's python.exe stub fails here too, as it should.
    & $exe @pre -c $VersionCheck 2>$null | Out-Null
    return ($LASTEXITCODE -eq 0)
}

$Py = $null
if ($env:PYTHON) {
    if (-not (Get-Command $env:PYTHON -CommandType Application -ErrorAction SilentlyContinue)) {
        Stop-Install "PYTHON=$($env:PYTHON): no such program"
    }
    if (-not (Test-Python @($env:PYTHON))) {
        Stop-Install "PYTHON=$($env:PYTHON) does not run, or is older than Python 3.9"
    }
    $Py = @($env:PYTHON)
} else {
    foreach ($cand in @(@('py', '-3'), @('python'), @('python3'))) {
        if (Test-Python $cand) { $Py = $cand; break }
    }
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
$PyVersion = (& $PyExe @PyPre -c "import sys; print('%d.%d.%d' % sys.version_info[:3])").Trim()
Write-Host "Using $PyText (Python $PyVersion)"

# ---- pip ----------------------------------------------------------------------
& $PyExe @PyPre -m pip --version 2>$null | Out-Null
if ($LASTEXITCODE -ne 0) {
    Write-Host "install.ps1: error: pip is not available for $PyText (Python $PyVersion)." -ForegroundColor Red
    Write-Host "Fix it with this command, then run .\install.ps1 again:"
    Write-Host "  $PyText -m ensurepip --upgrade"
    Write-Host "(or reinstall Python from python.org with the 'pip' option ticked)"
    Pop-Location
    exit 1
}

$env:PIP_DISABLE_PIP_VERSION_CHECK = '1'

function Invoke-Pip([string]$ReqFile, [string[]]$PipArgs) {
    & $PyExe @PyPre -m pip install @PipArgs -r $ReqFile
    if ($LASTEXITCODE -ne 0) {
        Write-Host ""
        Write-Host "install.ps1: error: pip could not install the packages in $ReqFile (pip's message is above)." -ForegroundColor Red
        Write-Host "  - The first install needs to reach PyPI. After that, copy this whole folder,"
        Write-Host "    _vendor\ included, to machines without internet: they need no install."
        Write-Host "  - If pip says 'no such option', it is too old: $PyText -m pip install --user --upgrade pip"
        Pop-Location
        exit 1
    }
}

# ---- runtime packages: pure wheels for the Python 3.9 floor -------------------
Write-Host ""
Write-Host "==> Installing runtime packages (requirements.txt) into _vendor\"
Invoke-Pip 'requirements.txt' @('--target', '_vendor', '--upgrade', '--no-warn-conflicts',
    '--only-binary=:all:', '--platform', 'any', '--python-version', '3.9',
    '--implementation', 'py', '--no-deps')

# ---- test packages: for this interpreter --------------------------------------
if ($Dev) {
    Write-Host ""
    Write-Host "==> Installing test packages (requirements-dev.txt) into _vendor\ for Python $PyVersion"
    Invoke-Pip 'requirements-dev.txt' @('--target', '_vendor', '--upgrade', '--no-warn-conflicts')
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
Pop-Location
exit 0
