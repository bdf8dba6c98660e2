"""The package limits the LAPACK library that jaxlib calls on CPU (SciPy's OpenBLAS)."""

import pytest
from threadpoolctl import ThreadpoolController

from emsedit_jax import lapack_threads


def _scipy_openblas_threads() -> dict[str, int]:
    return {lib.filepath: lib.num_threads for lib in ThreadpoolController().lib_controllers
            if lib.internal_api == "openblas" and lapack_threads._scipy_library(lib.filepath)}


def test_import_leaves_scipy_openblas_at_one_thread_and_limit_sets_it():
    import emsedit_jax  # noqa: F401  (the import ran limit())
    before = _scipy_openblas_threads()
    assert before and set(before.values()) == {1}
    try:
        changed = lapack_threads.limit(2)
        assert sorted(changed) == sorted(before)
        assert set(_scipy_openblas_threads().values()) == {2}
        assert lapack_threads.limit(0) == []                    # 0: leave it as it is
        assert set(_scipy_openblas_threads().values()) == {2}
    finally:
        lapack_threads.limit(1)
    assert set(_scipy_openblas_threads().values()) == {1}


def test_bad_thread_count_in_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(lapack_threads.ENV, "many")
    with pytest.raises(ValueError, match="EMSEDIT_JAX_LAPACK_THREADS.*'many'"):
        lapack_threads.limit()
    monkeypatch.setenv(lapack_threads.ENV, "0")
    assert lapack_threads.limit() == []
