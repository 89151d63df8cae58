// The one error convention of the C core: every entry point that can fail
// returns a kvc_status and, on failure, leaves a message for the calling
// thread in kvc_last_error(). Functions that cannot fail (getters, frees)
// return their value or nothing.
#ifndef KVCELLS_STATUS_H
#define KVCELLS_STATUS_H

// cffi-begin
typedef enum {
    KVC_OK = 0,
    KVC_EINVAL = 1,   // bad arguments
    KVC_EFULL = 2,    // no room in the cell table
    KVC_ESTATE = 3,   // a saved state that cannot be read
    KVC_ENOMEM = 4,
    KVC_EBROKEN = 5,  // a broken invariant (kvc_check)
} kvc_status;

// The message of this thread's last failed call.
const char *kvc_last_error(void);
// cffi-end

// Records the message of a failure and returns s.
kvc_status kvc_fail(kvc_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
