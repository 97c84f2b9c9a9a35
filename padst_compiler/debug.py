"""The graph-diff debugging tool (design section 6).

Recording: ``write_run`` stores one run per compiled graph under ``DIR/run-NNN/``:
``summary.json`` (per pass: changed, seconds, node counts before and after, largest
output difference from the original graph) and the readable code before and after
every pass; the same snapshots go to PyTorch's structured trace (``TORCH_TRACE``, read
by tlparse). ``write_kernel_choices`` adds ``kernel_choices.json``: which implementation
each CPU op picked per shape regime, with the measured times (written when the process
exits for a backend debug directory, since the choices are made at run time). Reading: ``load_runs``, ``summary_table``, ``pass_diff``, ``first_bad_pass``,
``render_text`` and ``render_html`` (one self-contained file) serve ``padst diff`` and tests.
"""

from __future__ import annotations

import difflib
import html
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from tabulate import tabulate
from torch._logging import trace_structured

from padst_compiler import outputs

DEFAULT_TOLERANCE = 1e-4
COUNT_KEYS = ("permutes", "gathers", "fused_gathers", "nodes")


class DebugDirError(outputs.PathError):
    """A debug directory that is missing, empty or not written by padst."""


def _unreadable(path: Path, what: str, error: Exception) -> DebugDirError:
    detail = error if isinstance(error, outputs.PathError) else f"{type(error).__name__}: {error}"
    return DebugDirError(f"{path} is not a readable {what} ({detail})")


# ------------------------------------------------------------------------- writing


def write_run(directory: str | Path, result, original_code: str) -> Path:
    """Store the records of one pipeline run (a ``PipelineResult``) in a new ``run-NNN`` folder."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name[4:]) for p in root.glob("run-*") if p.name[4:].isdigit()]
    run = root / f"run-{max(numbers, default=0) + 1:03d}"
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
        trace_structured("artifact", metadata_fn=lambda stem=stem: {"name": f"padst_{run.name}_{stem}",
                                                                     "encoding": "string"},
                         payload_fn=lambda record=record: record.code_after)
    outputs.write_json(run / "summary.json", {"passes": passes})  # last and whole: it vouches for the run
    return run


KERNEL_CHOICES = "kernel_choices.json"
_choice_dirs: set[Path] = set()


def write_kernel_choices(directory: str | Path) -> Path:
    """Store the implementation picked for every op and shape regime so far (see ``kernels/eager/select.py``)."""
    from padst_compiler.kernels.eager import select

    path = Path(directory) / KERNEL_CHOICES
    path.parent.mkdir(parents=True, exist_ok=True)
    return outputs.write_json(path, select.choices())


def write_kernel_choices_at_exit(directory: str | Path) -> None:
    """Write the kernel choices into ``directory`` when the process ends (once per directory)."""
    import atexit

    root = Path(directory).resolve()
    if root not in _choice_dirs:
        _choice_dirs.add(root)
        atexit.register(write_kernel_choices, root)


def kernel_choices_table(directory: str | Path) -> str | None:
    """The recorded kernel choices as a table, or ``None`` if none were recorded."""
    path = Path(directory) / KERNEL_CHOICES
    if not path.is_file():
        return None
    try:
        rows = [(c["op"], " ".join(c["regime"]), c["chosen"], "  ".join(f"{n} {ms:.3f}" for n, ms in c["ms"].items()))
                for c in outputs.read_json(path)]
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # PathError is a ValueError
        raise _unreadable(path, "padst kernel-choices file", error) from None
    return tabulate(rows, headers=["op", "regime (tokens bucket, features, dtype, shapes, in/out index)", "chosen",
                                   "measured ms"], disable_numparse=True)


# ------------------------------------------------------------------------- reading


@dataclass
class PassView:
    name: str
    changed: bool
    seconds: float
    counts_before: dict
    counts_after: dict
    max_abs_diff: float | None
    code_before: str
    code_after: str


@dataclass
class Run:
    name: str
    passes: list[PassView]


def load_runs(directory: str | Path) -> list[Run]:
    root = Path(directory)
    if not root.is_dir():
        raise DebugDirError(f"{root} is not a directory")
    runs = []
    for folder in sorted(root / name for name in outputs.list_dir(root) if name.startswith("run-")):
        try:
            summary = outputs.read_json(folder / "summary.json")
            passes = [PassView(p["name"], p["changed"], p["seconds"], p["counts_before"], p["counts_after"],
                               p.get("max_abs_diff"), outputs.read_text(folder / f"{p['file']}.before.py"),
                               outputs.read_text(folder / f"{p['file']}.after.py")) for p in summary["passes"]]
        except (outputs.PathError, KeyError, TypeError, AttributeError) as error:
            raise _unreadable(folder, "padst run", error) from None
        runs.append(Run(folder.name, passes))
    if not runs:
        raise DebugDirError(f"{root} holds no padst run (run-NNN folders); compile with "
                            "debug_dir=... or PADST_DEBUG_DIR set")
    return runs


def first_bad_pass(run: Run, tolerance: float = DEFAULT_TOLERANCE) -> PassView | None:
    """The first pass whose outputs differ from the original graph's by more than ``tolerance``."""
    return next((p for p in run.passes if p.max_abs_diff is not None and p.max_abs_diff > tolerance), None)


def _count_change(view: PassView, key: str) -> str:
    before, after = view.counts_before.get(key, 0), view.counts_after.get(key, 0)
    return str(before) if before == after else f"{before} -> {after}"


def summary_table(run: Run, tolerance: float = DEFAULT_TOLERANCE) -> str:
    rows = []
    for view in run.passes:
        diff = "-" if view.max_abs_diff is None else f"{view.max_abs_diff:.2e}"
        if view.max_abs_diff is not None and view.max_abs_diff > tolerance:
            diff += " !"
        rows.append((view.name, "yes" if view.changed else "no", *(_count_change(view, k) for k in COUNT_KEYS),
                     diff, f"{view.seconds * 1e3:.1f}"))
    return tabulate(rows, headers=["pass", "changed", "permutes", "gathers", "fused", "nodes", "max |diff|", "ms"],
                    disable_numparse=True)


_CLEANUP_TAIL = re.compile(r";\s+(\w+\s*=\s*)+None\s*$")


def normalize_code(code: str) -> list[str]:
    """Lines worth diffing: no comments (Dynamo's long source-location lines would drown the
    change and misalign the columns) and no ``;  x = None`` clean-up tails."""
    lines = []
    for line in code.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        lines.append(_CLEANUP_TAIL.sub("", line).rstrip())
    return lines


_COLORS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}


def code_diff(before: str, after: str, color: bool = False, names: tuple[str, str] = ("before", "after")) -> str:
    lines = difflib.unified_diff(normalize_code(before), normalize_code(after), *names, lineterm="")
    if not color:
        return "\n".join(lines)
    return "\n".join(f"{_COLORS[line[0]]}{line}\033[0m" if line[:1] in _COLORS else line for line in lines)


def render_text(runs: list[Run], color: bool = False, tolerance: float = DEFAULT_TOLERANCE) -> str:
    parts = []
    for run in runs:
        parts.append(f"== {run.name} ==\n{summary_table(run, tolerance)}")
        bad = first_bad_pass(run, tolerance)
        if bad is not None:
            parts.append(f"first pass that changed the numbers: {bad.name} (max |diff| {bad.max_abs_diff:.3e} > "
                         f"{tolerance:g})")
        for view in run.passes:
            if view.changed:
                parts.append(f"-- {view.name} --\n" + code_diff(view.code_before, view.code_after, color,
                                                                (f"{view.name}.before", f"{view.name}.after")))
    return "\n\n".join(parts)


_CSS = """body{font-family:sans-serif;margin:1.5em} table.summary td,table.summary th{padding:2px 10px}
details{margin:.6em 0;border:1px solid #ccc;padding:.3em} summary{cursor:pointer;font-weight:bold}
.bad{color:#b00} table.diff{font-family:monospace;font-size:12px;border-collapse:collapse}
.diff_add{background:#cfc} .diff_chg{background:#ffc} .diff_sub{background:#fcc} td.diff_header{color:#999}"""


_HTML_HEAD = "<!DOCTYPE html><html><head><meta charset='utf-8'><title>padst graph diff</title>"


def render_html(runs: list[Run], tolerance: float = DEFAULT_TOLERANCE) -> str:
    """One self-contained page: summary per run, then each pass side by side, collapsible."""
    body = ["<h1>padst graph diff</h1>"]
    differ = difflib.HtmlDiff(wrapcolumn=100)
    for run in runs:
        body.append(f"<h2>{html.escape(run.name)}</h2>")
        body.append(tabulate([[p.name, "yes" if p.changed else "no", *(_count_change(p, k) for k in COUNT_KEYS),
                               "-" if p.max_abs_diff is None else f"{p.max_abs_diff:.2e}"] for p in run.passes],
                             headers=["pass", "changed", "permutes", "gathers", "fused", "nodes", "max |diff|"],
                             tablefmt="html").replace("<table>", '<table class="summary">'))
        bad = first_bad_pass(run, tolerance)
        if bad is not None:
            body.append(f'<p class="bad">First pass that changed the numbers: <b>{html.escape(bad.name)}</b> '
                        f"(max |diff| {bad.max_abs_diff:.3e})</p>")
        for view in run.passes:
            table = differ.make_table(normalize_code(view.code_before), normalize_code(view.code_after),
                                      "before", "after", context=True, numlines=3)
            state = "changed" if view.changed else "unchanged"
            body.append(f'<details class="pass" data-pass="{html.escape(view.name)}"{" open" if view.changed else ""}>'
                        f"<summary>{html.escape(view.name)} ({state})</summary>{table}</details>")
    return f"{_HTML_HEAD}<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"


def is_html_report(text: str) -> bool:
    """Whether ``text`` is a page ``render_html`` wrote (``padst diff --html`` may replace it)."""
    return text.startswith(_HTML_HEAD)
