"""The persistent compilation cache: where it goes, that importing the package leaves it
off, and that a second process loads what the first compiled instead of compiling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emsedit_jax.compile_cache import cache_dir

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
import jax, jax.numpy as jnp
import emsedit_jax.cli, emsedit_jax.evaluate, emsedit_jax.train          # importing switches nothing on
assert jax.config.jax_compilation_cache_dir is None, jax.config.jax_compilation_cache_dir
from emsedit_jax.compile_cache import enable
folder = enable(min_compile_seconds=0)
hits = []
class Hits(logging.Handler):
    def emit(self, record):
        if "cache hit" in record.getMessage().lower():
            hits.append(record.getMessage())
logger = logging.getLogger("jax._src.compiler")
logger.setLevel(logging.DEBUG)
logger.addHandler(Hits())
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))
f(jnp.ones((32, 16))).block_until_ready()
print("FOLDER", folder, "HITS", len(hits))
"""


def test_cache_folder_resolution(monkeypatch, tmp_path):
    assert cache_dir(tmp_path / "a") == tmp_path / "a"
    for off in ("off", "0", "False", ""):
        monkeypatch.setenv("EMSEDIT_JAX_COMPILE_CACHE", off)
        assert cache_dir() is None
    monkeypatch.setenv("EMSEDIT_JAX_COMPILE_CACHE", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "b"
    monkeypatch.delenv("EMSEDIT_JAX_COMPILE_CACHE")
    monkeypatch.setenv("EMSEDIT_JAX_CACHE", str(tmp_path / "root"))
    assert cache_dir() == tmp_path / "root" / "xla"      # beside the embedded model's conversion


def test_cli_flags():
    from emsedit_jax.cli import parse_args
    on = parse_args(["evaluate", "--editor", "e", "--compile-cache-dir", "/somewhere"])
    assert on.compile_cache is True and on.compile_cache_dir == "/somewhere"
    assert parse_args(["evaluate", "--editor", "e", "--no-compile-cache"]).compile_cache is False


def test_second_process_loads_the_compiled_program(tmp_path):
    env = {**os.environ, "EMSEDIT_JAX_COMPILE_CACHE": str(tmp_path / "xla"), "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                           check=False) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (r.stdout.split() for r in runs)
    assert first[1] == second[1] == str(tmp_path / "xla")
    assert first[-1] == "0" and int(second[-1]) >= 1, (first, second)
    assert any((tmp_path / "xla").iterdir())
    # Switched off: nothing is written.
    env["EMSEDIT_JAX_COMPILE_CACHE"] = "off"
    off = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert off.returncode == 0 and off.stdout.split()[1] == "None", off.stderr[-3000:]
