; Inno Setup (6.3 or later) script for the specd desktop app: a per-user installer, no administrator rights.
; Build it with packaging\windows\build.ps1, which passes the version of the installed specd package:
;   ISCC.exe /DAppVersion=0.1.0 /DAppVersionNumeric=0.1.0.0 packaging\windows\specd.iss
; Input: the PyInstaller bundle dist\specd-desktop (specd-desktop.exe, specd.exe, _internal\).
; Output: dist\specd-desktop-<version>-setup.exe.

#ifndef AppVersion
  #error AppVersion is not defined: build with packaging\windows\build.ps1 (ISCC /DAppVersion=...)
#endif
#ifndef AppVersionNumeric
  #define AppVersionNumeric "0.0.0.0"
#endif
#define Root AddBackslash(SourcePath) + "..\.."
#ifndef BundleDir
  #define BundleDir Root + "\dist\specd-desktop"
#endif
#ifndef OutputDir
  #define OutputDir Root + "\dist"
#endif
; build.ps1 makes the smallest installer; the Linux build under Wine passes a faster setting (README).
#ifndef Compression
  #define Compression "lzma2/max"
#endif
#define AppName "specd"
#define AppExe "specd-desktop.exe"

[Setup]
; The AppId identifies the product across versions (upgrades replace, never duplicate); never change it.
AppId={{6E0C9B2A-4F1D-4C59-9B7E-3A52D8C1F0A7}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=specd
VersionInfoVersion={#AppVersionNumeric}
VersionInfoProductVersion={#AppVersionNumeric}
VersionInfoDescription={#AppName} installer
; Per user, no elevation: the app goes to %LOCALAPPDATA%\Programs\specd, shortcuts to the user's Start Menu.
PrivilegesRequired=lowest
; %LOCALAPPDATA%\Programs, what {userpf} names on Windows; Wine 8 cannot expand {userpf} (its
; SHGetKnownFolderPath refuses FOLDERID_UserProgramFiles), and setup.exe stopped there.
DefaultDirName={localappdata}\Programs\{#AppName}
DisableDirPage=auto
DisableProgramGroupPage=yes
UsePreviousAppDir=yes
; Upgrading while the app runs: close it (Restart Manager), install, and do not restart it behind the user's back.
CloseApplications=force
CloseApplicationsFilter=*.exe,*.dll,*.pyd
RestartApplications=no
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
MinVersion=10.0.17763
WizardStyle=modern
SetupIconFile={#Root}\desktop\ui\specd.ico
UninstallDisplayIcon={app}\{#AppExe}
UninstallDisplayName={#AppName}
OutputDir={#OutputDir}
OutputBaseFilename=specd-desktop-{#AppVersion}-setup
Compression={#Compression}
SolidCompression=yes

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked
Name: "startup"; Description: "Start specd when I sign in"; GroupDescription: "Startup:"; Flags: unchecked

[InstallDelete]
; A new version's bundle replaces the old one whole: no stale libraries from the previous version.
Type: filesandordirs; Name: "{app}\_internal"

[Files]
Source: "{#BundleDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"
Name: "{autodesktop}\{#AppName}"; Filename: "{app}\{#AppExe}"; WorkingDir: "{app}"; Tasks: desktopicon

[Registry]
; Start on sign-in, per user; the value goes away with the app.
Root: HKCU; Subkey: "Software\Microsoft\Windows\CurrentVersion\Run"; ValueType: string; ValueName: "{#AppName}"; ValueData: """{app}\{#AppExe}"""; Flags: uninsdeletevalue; Tasks: startup

[Run]
Filename: "{app}\{#AppExe}"; Description: "{cm:LaunchProgram,{#AppName}}"; Flags: nowait postinstall skipifsilent

[UninstallRun]
; The uninstaller cannot remove files of a running app: end it first.
Filename: "{sys}\taskkill.exe"; Parameters: "/F /T /IM {#AppExe}"; Flags: runhidden; RunOnceId: "StopSpecd"

[UninstallDelete]
Type: filesandordirs; Name: "{app}"

[Code]
// Settings, logs and the draft models specd prepared live in %LOCALAPPDATA%\specd (shared/paths.py).
// Uninstalling removes them only when the user says so; silent uninstalls keep them. Models downloaded
// from the Hugging Face hub stay in the hub's shared cache, which other programs use too.
procedure CurUninstallStepChanged(CurUninstallStep: TUninstallStep);
var
  DataDir: String;
begin
  if CurUninstallStep = usPostUninstall then
  begin
    DataDir := ExpandConstant('{localappdata}\{#AppName}');
    if DirExists(DataDir) and not UninstallSilent() then
    begin
      if MsgBox('Also remove your specd settings, logs and prepared models?' + #13#10 + #13#10 + DataDir,
                mbConfirmation, MB_YESNO or MB_DEFBUTTON2) = IDYES then
        DelTree(DataDir, True, True, True);
    end;
  end;
end;
