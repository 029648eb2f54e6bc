/* What the C test programs share: a failure count and CHECK, which reports a
 * failed condition with its place and goes on (the program exits non-zero at
 * the end when `failures` is not 0). */
#ifndef KHOD_TESTS_CHECK_H
#define KHOD_TESTS_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond, ...)                                               \
    do {                                                               \
        if (!(cond)) {                                                 \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                \
            printf(__VA_ARGS__);                                       \
            printf("\n");                                              \
            fflush(stdout);                                            \
            failures++;                                                \
        }                                                              \
    } while (0)

#endif
