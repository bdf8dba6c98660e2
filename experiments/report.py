"""Writing an experiment's results: the printed table as Markdown and the rows as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path, text: str, payload: dict) -> None:
    """Prints `text` and writes it to OUT.md, and `payload` to OUT.json (OUT: a path
    without suffix; its folder is created)."""
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def flags_label(flags: str | None) -> str:
    """An XLA_FLAGS setting as a table cell: None (the environment's, unchanged), '' or the flags."""
    return "(environment's)" if flags is None else f"`{flags}`" if flags else "none"


def run_with_code(script: str | Path, args: list[str], code: str, root: Path, env: dict | None = None) -> dict:
    """Runs `script args` in a fresh Python process with the emsedit_jax package of
    `code` (a folder; "." = `root`, this checkout) first on the path, and returns the
    dict its last "RESULT {json}" line of output holds (stops the benchmark on failure).
    `env`: variables set for that process on top of this one's."""
    import os
    import subprocess
    import sys
    src = (root if code == "." else Path(code)).resolve()
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{script} {' '.join(args)} with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(found[-1][len("RESULT "):])


def run_timed(cmd: list[str], env: dict, cwd: str | Path | None = None) -> tuple[float, str]:
    """(wall seconds, stdout and stderr) of one process; stops the benchmark on failure."""
    import subprocess
    import time
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr
