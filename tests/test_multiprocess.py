"""Two JAX processes on this machine (a 127.0.0.1 coordinator, gloo collectives, 2 host
devices each) edit, take a meta-training step, score and save / restore the editor on
a mesh over all 4 devices, and get the numbers of one process on one device
(tests/multiprocess_check.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("multiprocess_check.py")
TIMEOUT = 600
TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir, out_dir, process_id: int, n: int, port: int, devices: int) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"}
    log = open(Path(out_dir) / f"log_{n}_{process_id}.txt", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir), str(out_dir), str(process_id), str(n),
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def results(tiny_model_dir, tmp_path_factory):
    ref_dir, multi_dir = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    port = free_port()
    procs = [start(tiny_model_dir, ref_dir, 0, 1, 0, 1)] + [start(tiny_model_dir, multi_dir, i, 2, port, 2)
                                                          for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    finally:
        for p in procs:           # a worker left waiting for a dead peer stops here
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {f.name: f.read_text()[-3000:] for d in (ref_dir, multi_dir) for f in sorted(d.glob("log_*.txt"))}
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    return [json.loads((d / f"result_{i}.json").read_text()) for d, i in ((ref_dir, 0), (multi_dir, 0),
                                                                         (multi_dir, 1))]


def close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=TOL, atol=TOL * max(1.0, float(np.abs(b).max()))))


def test_two_processes_match_one(results):
    ref, p0, p1 = results
    assert (ref["process_count"], ref["device_count"]) == (1, 1)
    for p in (p0, p1):
        assert (p["process_count"], p["device_count"], p["local_devices"]) == (2, 4, 2)
        for key in ("edit_deltas", "train_deltas"):
            for m in ref[key]:
                assert close(p[key][m], ref[key][m]), (key, m)
        for key in ("edit_stats", "train_nets"):
            assert all(close(x, y) for x, y in zip(p[key], ref[key])), key
        for k, v in ref["train_metrics"].items():
            assert close(p["train_metrics"][k], v), k
        for k, v in ref["scores"].items():     # per-request ES / GS / LS, every process sees all 16
            np.testing.assert_allclose(p["scores"][k], v, atol=1e-6)
        assert p["restored_equal"] and "data" in p["restored_sharding"]
    assert ref["restored_equal"]
