/* Test-prefix stand-in: Windows 10/11 export ProcessPrng from bcryptprimitives.dll, Wine 8 does not.
   Rust's standard library (>= 1.78, inside onnxruntime-genai) draws its random bytes from it. */
#include <windows.h>
#include <ntsecapi.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T size)
{
    while (size) {
        ULONG chunk = size > 0x10000000 ? 0x10000000 : (ULONG)size; /* RtlGenRandom takes a ULONG */
        if (!RtlGenRandom(data, chunk)) return FALSE;
        data += chunk;
        size -= chunk;
    }
    return TRUE;
}
