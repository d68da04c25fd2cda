"""Which kernels NumPy's BLAS runs, asked of the loaded library.

`_blas_core` is printed into every emitted module (`codegen.render`: its source, as is),
which decides at import whether its dense kernels give small products to OpenBLAS's
small-matrix kernels (chooser.SMALL_KERNEL_CORES); `dbpgen bench` prints it beside its
tables. It uses only the standard library, as an emitted module must.
"""
import ctypes
import inspect


def _blas_core():
    """The kernels NumPy's OpenBLAS runs ('Haswell', 'SkylakeX', ...: by CPU model, or as
    OPENBLAS_CORETYPE forces), read from the loaded library (Linux); '' where the BLAS is
    not OpenBLAS or cannot be asked."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return ""
    for path in sorted(paths, key=lambda p: ("numpy" not in p, p)):  # NumPy's own first
        try:
            corename = ctypes.CDLL(path).gotoblas_corename
        except (OSError, AttributeError):
            continue
        corename.restype = ctypes.c_char_p
        return (corename() or b"").decode()
    return ""


blas_core = _blas_core
SOURCE = inspect.getsource(_blas_core)
