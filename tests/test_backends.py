"""The backend switch: auto falls back with one warning, a named missing backend raises."""

from __future__ import annotations

import warnings

import pytest

from e3relax_fast import backends


def test_auto_falls_back_with_one_warning_and_named_missing_raises():
    op = "test_op_a"
    backends.register(op, "reference", lambda: "ref")
    backends.mark_missing(op, "cuda", "no GPU in this test")
    backends.declare(op, {"cuda": ("cuda", "reference")})
    with pytest.warns(UserWarning, match="no 'cuda' backend \\(no GPU in this test\\)"):
        assert backends.resolve(op, "auto", "cuda")[0] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        assert backends.resolve(op, "auto", "cuda")[0] == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="no GPU in this test"):
        backends.resolve(op, "cuda", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve(op, "fastest", "cpu")


def test_auto_skips_listed_backends_but_named_ones_are_honoured():
    op = "test_op_b"
    backends.declare(op, {"cuda": ("cuda", "triton", "reference")})
    backends.register(op, "reference", lambda: "ref")
    backends.register(op, "cuda", lambda: "cuda")
    assert backends.resolve(op, "auto", "cuda")[0] == "cuda"
    with pytest.warns(UserWarning):
        assert backends.resolve(op, "auto", "cuda", skip=("cuda",))[0] == "reference"
    assert backends.resolve(op, "cuda", "cuda", skip=("cuda",))[0] == "cuda"
