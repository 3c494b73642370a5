"""Small C kernels, compiled with the system's ``cc`` on first use in a process and run
through ctypes (ctypes releases the GIL, so worker threads run them in parallel).

Why C at all, and not torch's C++-extension builder: the kernels are one loop each over data
that torch or NumPy would walk several times (:mod:`msm_kernel`, :mod:`auroc`,
:mod:`reaggregate_kernel`); a plain C compiler builds them in 0.1–3 s each (measured here), torch's builder
needs a C++ toolchain and its headers and takes much longer. Every kernel has a pure
torch/NumPy path with the same results, taken where no compiler works.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence


def compile_library(what: str, source: str, fallback: str,
                    signatures: Mapping[str, tuple[type | None, Sequence[type]]]) -> ctypes.CDLL | None:
    """``source`` built with ``-O3`` for this CPU and loaded, its functions' ctypes
    ``signatures`` set ({name: (restype, argtypes)}); None, with a warning naming ``what`` and the
    ``fallback`` used instead, when ``cc`` (or ``$CC``) is missing or fails."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    tmp = tempfile.mkdtemp(prefix="musc-native-")
    src, lib = os.path.join(tmp, "kernel.c"), os.path.join(tmp, "kernel.so")
    with open(src, "w") as f:
        f.write(source)
    for flags in (["-march=native"], []):  # a compiler that does not know -march=native still works
        run = subprocess.run([cc, "-O3", "-fno-math-errno", *flags, "-shared", "-fPIC", "-o", lib, src],
                             capture_output=True, text=True)
        if run.returncode == 0:
            break
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"{what} did not compile ({run.stderr[-500:]}); {fallback}", stacklevel=3)
        return None
    dll = ctypes.CDLL(lib)
    shutil.rmtree(tmp, ignore_errors=True)  # the loaded library stays mapped
    for name, (restype, argtypes) in signatures.items():
        getattr(dll, name).restype, getattr(dll, name).argtypes = restype, list(argtypes)
    return dll
