"""The output gate of the `mamba` block (docs/architecture.md): out = y * silu(z), forward and backward.

Notation: n rows (B*T tokens), C channels (E*D, the expanded width); y is the scan output, z the
gate half of in_proj.

    forward   s = sigmoid(z) ; out = y * z * s
    backward  dy += dout * z * s
              dz += dout * y * s * (1 + z * (1 - s))          (silu'(z) = s*(1 + z*(1-s)))
              out = y * z * s                                  (written again: see below)

What forward saves: nothing. The stack keeps y and z (both needed by the backward) and NOT `out`
(n x C floats per layer): the backward writes the recomputed `out` in the same pass that reads y
and z, and the model uses it for the out_proj weight gradient (out^T dout_proj) straight away.

Parallel decomposition: prange over rows; every element is independent, so results are bitwise
identical for any n_threads. Backward ACCUMULATES (+=) into dy and dz and overwrites out.
All arrays are float32, 2-D (n, C) and C-contiguous; shapes are checked in the `def` wrappers.
"""
from cython.parallel cimport prange
from _common cimport check_threads, sigmoidf, rf, rcf, shape_of



cdef _check(str fn, dict arrays, tuple shape):
    for name, arr in arrays.items():
        if shape_of(arr) != shape:
            raise ValueError(f"{fn}: {name} has shape {shape_of(arr)}, expected y's shape {shape}")


cdef inline void _gate_row(rf out, rcf y, rcf z, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t j
    cdef float zz
    # out = y * silu(z) = y * z * sigmoid(z)
    for j in range(C):
        zz = z[j]
        out[j] = y[j] * (zz * sigmoidf(zz))


def gate_forward(float[:, ::1] out,        # OUT (n,C)
                 const float[:, ::1] y,    # IN  (n,C)
                 const float[:, ::1] z,    # IN  (n,C)
                 int n_threads):
    """out (n,C) = y * silu(z)."""
    check_threads(n_threads)
    cdef Py_ssize_t n = y.shape[0], C = y.shape[1], i
    _check("gate_forward", {"out": out, "z": z}, shape_of(y))
    if n == 0 or C == 0:
        return
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _gate_row(&out[i, 0], &y[i, 0], &z[i, 0], C)


cdef inline void _gate_row_backward(rf dy, rf dz, rf out, rcf dout, rcf y, rcf z,
                                    Py_ssize_t C) noexcept nogil:
    # restrict-qualified (kernels/_common.pxd): six buffers are more than gcc checks for aliasing
    # at run time, so without it this loop stays scalar (n 512 x C 1024, 1 thread: 3.7 -> 0.72 ms)
    cdef Py_ssize_t j
    cdef float zz, s, sz, g
    for j in range(C):
        zz = z[j]
        s = sigmoidf(zz)
        sz = zz * s
        g = dout[j]
        # dy += dout*silu(z) ; dz += dout*y*silu'(z) ; out = y*silu(z)
        dy[j] += g * sz
        dz[j] += g * y[j] * (s * (<float>1 + zz * (<float>1 - s)))
        out[j] = y[j] * sz


def gate_backward(float[:, ::1] dy,          # OUT += (n,C)
                  float[:, ::1] dz,          # OUT += (n,C)
                  float[:, ::1] out,         # OUT (n,C) the forward output, recomputed
                  const float[:, ::1] dout,  # IN  (n,C)
                  const float[:, ::1] y,     # IN  (n,C)
                  const float[:, ::1] z,     # IN  (n,C)
                  int n_threads):
    """Backward of gate_forward: ACCUMULATES into dy, dz; writes out = y * silu(z) again."""
    check_threads(n_threads)
    cdef Py_ssize_t n = y.shape[0], C = y.shape[1], i
    _check("gate_backward", {"dy": dy, "dz": dz, "out": out, "dout": dout, "z": z}, shape_of(y))
    if n == 0 or C == 0:
        return
    for i in prange(n, schedule='static', num_threads=n_threads, nogil=True):
        _gate_row_backward(&dy[i, 0], &dz[i, 0], &out[i, 0], &dout[i, 0], &y[i, 0], &z[i, 0], C)
