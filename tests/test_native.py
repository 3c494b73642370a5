"""core/native.py: the C kernels' compile-and-load step, and its fallback without a compiler."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from musc_pipeline.core import native

SOURCE = "int answer(int x) { return 2 * x + 1; }\n"


def test_compiles_and_loads_a_kernel_with_its_signatures():
    lib = native.compile_library("test kernel", SOURCE, "no fallback", {"answer": (ctypes.c_int, [ctypes.c_int])})
    assert lib is not None and lib.answer(20) == 41
    assert lib.answer.argtypes == [ctypes.c_int]
    with pytest.raises(ctypes.ArgumentError):  # the signature is enforced
        lib.answer("twenty")


def test_a_failing_or_missing_compiler_warns_names_the_fallback_and_returns_none(monkeypatch):
    monkeypatch.setenv("CC", shutil.which("false"))  # a "compiler" that always fails
    with pytest.warns(UserWarning, match=r"test kernel did not compile .*; using the slow path"):
        assert native.compile_library("test kernel", SOURCE, "using the slow path", {}) is None
    monkeypatch.setenv("CC", "no-such-cc-here")
    assert native.compile_library("test kernel", SOURCE, "using the slow path", {}) is None
