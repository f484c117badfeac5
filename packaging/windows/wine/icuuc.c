/* Test-prefix stand-in for the system icuuc.dll of Windows 10/11 (Wine < 11.5 has none).
   Qt only asks ICU for extra text codecs: every open fails, so Qt uses its built-in ones. */
#include <stddef.h>

typedef int UErrorCode; /* > 0 is a failure */
#define U_FAILED_HERE(status) do { if ((status) && *(status) <= 0) *(status) = 2; } while (0)

__declspec(dllexport) void *ucnv_open(const char *name, UErrorCode *status) { U_FAILED_HERE(status); return NULL; }
__declspec(dllexport) void ucnv_close(void *cnv) {}
__declspec(dllexport) void ucnv_reset(void *cnv) {}
__declspec(dllexport) void UCNV_FROM_U_CALLBACK_SUBSTITUTE(void) {}
__declspec(dllexport) void UCNV_TO_U_CALLBACK_SUBSTITUTE(void) {}
__declspec(dllexport) signed char ucnv_getMaxCharSize(const void *cnv) { return 1; }
__declspec(dllexport) const char *ucnv_getName(const void *cnv, UErrorCode *status) { U_FAILED_HERE(status); return NULL; }
__declspec(dllexport) const char *ucnv_getStandardName(const char *name, const char *standard, UErrorCode *status)
{ U_FAILED_HERE(status); return NULL; }
__declspec(dllexport) const char *ucnv_getAvailableName(int n) { return NULL; }
__declspec(dllexport) int ucnv_countAvailable(void) { return 0; }
__declspec(dllexport) void ucnv_getToUCallBack(const void *cnv, void **action, const void **context)
{ if (action) *action = NULL; if (context) *context = NULL; }
__declspec(dllexport) void ucnv_getFromUCallBack(const void *cnv, void **action, const void **context)
{ if (action) *action = NULL; if (context) *context = NULL; }
__declspec(dllexport) void ucnv_setToUCallBack(void *cnv, void *action, const void *context, void **old_action,
                                               const void **old_context, UErrorCode *status) { U_FAILED_HERE(status); }
__declspec(dllexport) void ucnv_setFromUCallBack(void *cnv, void *action, const void *context, void **old_action,
                                                 const void **old_context, UErrorCode *status) { U_FAILED_HERE(status); }
__declspec(dllexport) void ucnv_toUnicode(void *cnv, void **target, const void *target_limit, const char **source,
                                          const char *source_limit, int *offsets, signed char flush, UErrorCode *status)
{ U_FAILED_HERE(status); }
__declspec(dllexport) void ucnv_fromUnicode(void *cnv, char **target, const char *target_limit, const void **source,
                                            const void *source_limit, int *offsets, signed char flush, UErrorCode *status)
{ U_FAILED_HERE(status); }
__declspec(dllexport) void ucnv_cbToUWriteUChars(void *args, const void *source, int length, int offset,
                                                 UErrorCode *status) { U_FAILED_HERE(status); }
__declspec(dllexport) void ucnv_cbFromUWriteUChars(void *args, const void **source, const void *source_limit,
                                                   int offset, UErrorCode *status) { U_FAILED_HERE(status); }
__declspec(dllexport) int ucnv_toUCountPending(const void *cnv, UErrorCode *status) { U_FAILED_HERE(status); return 0; }
__declspec(dllexport) int ucnv_fromUCountPending(const void *cnv, UErrorCode *status) { U_FAILED_HERE(status); return 0; }
