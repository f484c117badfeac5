/* Test-prefix stand-in for mscms.dll: Wine 8's lacks WcsCreateIccProfile, which Qt >= 6.11's qwindows.dll
   imports when it runs under a display. Every query fails, so Qt assumes sRGB. Loaded with mscms=n only. */
#include <windows.h>

__declspec(dllexport) HANDLE WINAPI OpenColorProfileW(void *profile, DWORD access, DWORD share, DWORD creation)
{ SetLastError(ERROR_NOT_SUPPORTED); return NULL; }
__declspec(dllexport) BOOL WINAPI CloseColorProfile(HANDLE profile) { return TRUE; }
__declspec(dllexport) BOOL WINAPI GetColorProfileFromHandle(HANDLE profile, BYTE *buffer, DWORD *size)
{ SetLastError(ERROR_NOT_SUPPORTED); return FALSE; }
__declspec(dllexport) HANDLE WINAPI WcsCreateIccProfile(HANDLE profile, DWORD intent)
{ SetLastError(ERROR_NOT_SUPPORTED); return NULL; }
