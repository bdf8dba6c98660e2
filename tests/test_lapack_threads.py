"""Importing the package changes no thread pool; `limit()` (the CLI calls it at start)
sets the LAPACK library that jaxlib calls on CPU (SciPy's OpenBLAS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from threadpoolctl import ThreadpoolController

from emsedit_jax import lapack_threads

ROOT = Path(__file__).resolve().parents[1]


def _scipy_openblas_threads() -> dict[str, int]:
    return {lib.filepath: lib.num_threads for lib in ThreadpoolController().lib_controllers
            if lib.internal_api == "openblas" and lapack_threads._scipy_library(lib.filepath)}


def test_import_changes_no_thread_pool():
    """In a fresh process with SciPy's OpenBLAS loaded, `import emsedit_jax` and reaching
    its API leave every thread pool as it was; only an explicit call changes one."""
    code = """if True:
        import json
        import scipy.linalg.cython_lapack
        from threadpoolctl import threadpool_info
        before = threadpool_info()
        import emsedit_jax as ej
        ej.load_model, ej.EditorConfig, ej.TrainConfig     # the lazily loaded API
        after_import = threadpool_info()
        ej.limit_lapack_threads(1)
        print(json.dumps([before, after_import, threadpool_info()]))
    """
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after_import, after_limit = json.loads(out.stdout.splitlines()[-1])
    assert after_import == before
    scipy_before = [p["num_threads"] for p in before if lapack_threads._scipy_library(p["filepath"])]
    scipy_after = [p["num_threads"] for p in after_limit if lapack_threads._scipy_library(p["filepath"])]
    assert scipy_before and set(scipy_before) == {2} and set(scipy_after) == {1}


def test_limit_sets_and_restores_scipy_openblas():
    lapack_threads.limit(1)
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
