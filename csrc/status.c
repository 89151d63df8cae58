#include "status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char message[256];

const char *kvc_last_error(void) { return message; }

kvc_status kvc_fail(kvc_status s, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return s;
}
