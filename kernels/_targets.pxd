# Targets of the loss kernels (hpn, xent): int64 token ids in [0, V) or the ignore index -1.
# Header-only (inline functions), like _common.pxd.
from libc.stdint cimport int64_t

cdef enum:
    IGNORE = -1          # the ignore index of targets


cdef inline Py_ssize_t first_bad_target(const int64_t[::1] targets, int64_t V) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(targets.shape[0]):
        if (targets[i] < 0 and targets[i] != IGNORE) or targets[i] >= V:
            return i
    return -1


cdef inline check_targets(const int64_t[::1] targets, Py_ssize_t V):
    cdef Py_ssize_t bad
    with nogil:
        bad = first_bad_target(targets, <int64_t>V)
    if bad >= 0:
        raise ValueError(f"target {targets[bad]} at index {bad} is outside [0, {V}) "
                         f"(and is not the ignore index -1)")


cdef inline Py_ssize_t n_scored(const int64_t[::1] targets) noexcept nogil:
    cdef Py_ssize_t i, m = 0
    for i in range(targets.shape[0]):
        if targets[i] != IGNORE:
            m += 1
    return m
