"""Recording of pass runs for the graph-diff tool (design section 6).

``write_run`` stores one run per compiled graph under ``DIR/run-NNN/``: ``summary.json``
(per pass: changed, seconds, node counts before and after, largest output difference)
and the readable code of the graph before and after every pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from padst_compiler.pipeline import PipelineResult


def write_run(directory: str | Path, result: PipelineResult, original_code: str) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name.split("-")[1]) for p in root.glob("run-*") if p.name.split("-")[1].isdigit()),
                     default=0)
    run = root / f"run-{number:03d}"
    run.mkdir()
    (run / "original.py").write_text(original_code)
    passes = []
    for position, record in enumerate(result.records, 1):
        stem = f"{position:02d}-{record.name}"
        (run / f"{stem}.before.py").write_text(record.code_before)
        (run / f"{stem}.after.py").write_text(record.code_after)
        entry = asdict(record)
        del entry["code_before"], entry["code_after"]
        passes.append({"file": stem, **entry})
    (run / "summary.json").write_text(json.dumps({"passes": passes}, indent=2))
    return run
