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
