"""The course as a static HTML book: ``course-lib book`` (``make book``).

Each notebook is executed in a fresh ``python3`` kernel (nbclient; working directory = the
notebooks folder, so relative paths work as in JupyterLab), then rendered with nbconvert's
``lab`` HTML template. Plots are inline PNG outputs, which the template writes into the page as
``<img src="data:image/png;base64,...">``: every page is one self-contained file. A navigation
bar (previous · contents · next) is added to the top and bottom of every chapter, and
``index.html`` lists the chapters in order with their learning goals, the machine and the mode.

Fast mode (``COURSE_FAST=1``: small shapes, tiny models) is the default without a CUDA GPU, full
size with one; ``--fast`` / ``--full`` (or ``COURSE_FAST`` set in the environment) decide
otherwise. Notebooks run offline (``COURSE_OFFLINE=1``) unless ``--online``.

A notebook that fails is still rendered, up to and including the cell that raised (with its
traceback), under a banner saying so; the build goes on with the next chapter and exits non-zero
at the end, listing the failures.
"""

from __future__ import annotations

import html
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat

DEFAULT_NOTEBOOKS = "notebooks"
DEFAULT_OUT = "_build/html"
#: Seconds one cell may run before the build gives up on its notebook.
DEFAULT_TIMEOUT = 1200
KERNEL_NAME = "python3"
#: ipykernel only picks the inline backend when MPLBACKEND is unset; ``make test`` exports
#: MPLBACKEND=Agg, under which figures would never reach the page. The kernel always gets this.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_LIST_ITEM = re.compile(r"^\s{0,3}\d+[.)]\s+(.+)$", re.MULTILINE)


@dataclass
class Chapter:
    """One notebook of the book, before and after it was built."""

    source: Path
    title: str
    goals: list[str]
    html_name: str
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class BookResult:
    out_dir: Path
    chapters: list[Chapter]
    fast: bool
    offline: bool
    machine: str
    seconds: float = 0.0
    failures: list[Chapter] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"


# --- reading notebooks -----------------------------------------------------------------------


def find_notebooks(notebooks_dir: str | Path, only: Iterable[str] | None = None) -> list[Path]:
    """The notebooks of the book in order (file name order); with ``only``, those whose file
    name starts with one of its entries (``"01"``, ``"01_quantization_math"``, ``"01_quantization_math.ipynb"``)."""
    paths = sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if not p.name.startswith("."))
    if only:
        prefixes = [o.removesuffix(".ipynb") for o in only]
        paths = [p for p in paths if any(p.stem.startswith(prefix) for prefix in prefixes)]
    return paths


def _plain(markdown: str) -> str:
    """Inline markdown to plain text: links to their text, emphasis and code marks dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("**", "").replace("__", "").replace("`", "")
    text = re.sub(r"(?<!\w)[*_](\S(?:.*?\S)?)[*_](?!\w)", r"\1", text)
    return " ".join(text.split())


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:.")
    return cut + "…"


def chapter_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The text of the notebook's first markdown heading, else ``fallback``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = _HEADING.search(cell.source)
            if match:
                return _plain(match.group(1))
    return fallback


def learning_goals(nb: nbformat.NotebookNode, item_chars: int = 160,
                   paragraph_chars: int = 300) -> list[str]:
    """The learning goals from the first markdown cell, as short plain-text lines: its numbered
    list items, else its first paragraph that is not a heading."""
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        return []
    items = _LIST_ITEM.findall(first.source)
    if items:
        return [_shorten(_plain(item), item_chars) for item in items]
    body = _HEADING.sub("", first.source)
    for paragraph in re.split(r"\n\s*\n", body):
        if paragraph.strip():
            return [_shorten(_plain(paragraph), paragraph_chars)]
    return []


def read_chapters(paths: Sequence[Path]) -> list[Chapter]:
    chapters = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        chapters.append(Chapter(path, chapter_title(nb, path.stem), learning_goals(nb),
                                path.stem + ".html"))
    return chapters


# --- executing -------------------------------------------------------------------------------


def default_fast() -> bool:
    """Fast mode unless a CUDA GPU is present; ``COURSE_MODE`` or ``COURSE_FAST`` in the
    environment decides first."""
    if os.environ.get("COURSE_FAST", "").strip() or os.environ.get("COURSE_MODE", "").strip():
        from course_lib.runtime import is_fast

        return is_fast()
    import torch

    return not torch.cuda.is_available()


def kernel_env(fast: bool, offline: bool = True, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the notebooks' kernels run in."""
    env = dict(os.environ if base is None else base)
    env["MPLBACKEND"] = INLINE_BACKEND
    if fast:
        env["COURSE_FAST"], env["COURSE_MODE"] = "1", "fast"
    else:
        env.pop("COURSE_FAST", None)
        if env.get("COURSE_MODE", "").strip().lower() == "fast":
            env.pop("COURSE_MODE")
    if offline:
        env["COURSE_OFFLINE"] = "1"
    return env


def _error_summary(nb: nbformat.NotebookNode, exc: BaseException) -> str:
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} (0-based) raised {output.get('ename')}: {output.get('evalue')}"
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:500]


def execute_notebook(nb: nbformat.NotebookNode, cwd: Path, env: dict[str, str],
                     timeout: int = DEFAULT_TIMEOUT) -> str | None:
    """Run ``nb`` in place in a fresh kernel; None when every cell ran, else what went wrong.

    Execution stops at the first cell that raises (later cells would fail on its missing
    results); that cell keeps its traceback as an output, so the page shows it.
    """
    from nbclient import NotebookClient

    from course_lib.grading.notebook_runner import CurrentEnvKernelManager

    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL_NAME,
                            kernel_manager_class=CurrentEnvKernelManager,
                            resources={"metadata": {"path": str(cwd)}},
                            extra_arguments=["--log-level=ERROR"])  # not ipykernel's TCP warning
    try:
        client.execute(env=env)
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError, startup
        return _error_summary(nb, exc)
    return None


# --- rendering -------------------------------------------------------------------------------

_STYLE = """<style>
.book-nav { display: flex; justify-content: space-between; gap: 1em; align-items: baseline;
  max-width: 1200px; margin: 0.5em auto; padding: 0.6em 1em; border: 1px solid #ddd;
  border-radius: 6px; background: #f7f7f7; font: 14px/1.4 system-ui, sans-serif; }
.book-nav a { text-decoration: none; color: #1a5fb4; }
.book-nav a:hover { text-decoration: underline; }
.book-nav .book-prev, .book-nav .book-next { flex: 1; }
.book-nav .book-next { text-align: right; }
.book-failed { max-width: 1200px; margin: 0.5em auto; padding: 0.6em 1em; border: 1px solid #c01c28;
  border-radius: 6px; background: #fdecea; color: #7a0c13; font: 14px/1.4 system-ui, sans-serif; }
</style>
"""


def nav_html(chapters: Sequence[Chapter], position: int) -> str:
    """previous · contents · next links for ``chapters[position]``."""

    def link(i: int, rel: str, arrow_before: str, arrow_after: str) -> str:
        if not 0 <= i < len(chapters):
            return f'<span class="book-{rel}"></span>'
        c = chapters[i]
        return (f'<span class="book-{rel}"><a rel="{rel}" href="{html.escape(c.html_name)}">'
                f"{arrow_before}{html.escape(c.title)}{arrow_after}</a></span>")

    return ('<nav class="book-nav">'
            + link(position - 1, "prev", "← ", "")
            + '<span class="book-contents"><a rel="index" href="index.html">Contents</a></span>'
            + link(position + 1, "next", "", " →")
            + "</nav>\n")


def _inject(page: str, top: str, bottom: str) -> str:
    """Add the style to <head>, ``top`` after <body ...> and ``bottom`` before </body>."""
    page = page.replace("</head>", _STYLE + "</head>", 1) if "</head>" in page else _STYLE + page
    page, found = re.subn(r"(<body\b[^>]*>)", lambda m: m.group(1) + "\n" + top, page, count=1)
    if not found:
        page = top + page
    if "</body>" in page:
        head, _, tail = page.rpartition("</body>")
        return head + bottom + "</body>" + tail
    return page + bottom


def render_chapter(nb: nbformat.NotebookNode, chapters: Sequence[Chapter], position: int) -> str:
    """The executed notebook as one HTML page (images inline), with the navigation bar."""
    from nbconvert import HTMLExporter

    chapter = chapters[position]
    page, _ = HTMLExporter(template_name="lab").from_notebook_node(
        nb, resources={"metadata": {"name": chapter.title}})
    nav = nav_html(chapters, position)
    top = nav
    if chapter.failed:
        top += (f'<div class="book-failed"><strong>This chapter did not run to the end when the '
                f"book was built:</strong> {html.escape(chapter.error or '')}. The page shows the "
                "cells up to the one that failed.</div>\n")
    return _inject(page, top, nav)


def index_html(result: BookResult, built_at: datetime) -> str:
    mode = "fast (COURSE_FAST=1: small shapes, tiny models)" if result.fast else "full size"
    rows = []
    for c in result.chapters:
        goals = "".join(f"<li>{html.escape(g)}</li>" for g in c.goals)
        status = (f' <span class="failed" title="{html.escape(c.error or "")}">did not run to the end</span>'
                  if c.failed else "")
        rows.append(f'<li class="chapter"><a href="{html.escape(c.html_name)}">{html.escape(c.title)}</a>'
                    f'{status} <span class="time">({c.seconds:.0f} s)</span>'
                    + (f'<ol class="goals">{goals}</ol>' if goals else "") + "</li>")
    failed = f', <span class="failed">{len(result.failures)} failed</span>' if result.failures else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LLM inference optimization: the course as a book</title>
<style>
body {{ max-width: 900px; margin: 2em auto; padding: 0 1em; font: 16px/1.5 system-ui, sans-serif; color: #222; }}
h1 {{ font-size: 1.6em; }}
.meta {{ color: #555; font-size: 0.9em; }}
ol.chapters {{ list-style: none; padding-left: 0; }}
ol.chapters > li {{ margin: 1em 0; }}
ol.chapters > li > a {{ font-weight: 600; font-size: 1.1em; color: #1a5fb4; text-decoration: none; }}
ol.goals {{ font-size: 0.9em; color: #444; margin: 0.3em 0; }}
.failed {{ color: #c01c28; font-weight: 600; }}
.time {{ color: #888; font-size: 0.85em; }}
</style>
</head>
<body>
<h1>LLM inference optimization, from quantization to deployment</h1>
<p class="meta">The course's notebooks, executed and rendered with their outputs.
Built {html.escape(built_at.strftime("%Y-%m-%d %H:%M %Z"))} on {html.escape(result.machine)};
{html.escape(mode)}; {"offline" if result.offline else "online"};
{len(result.chapters)} chapter(s) in {result.seconds:.0f} s{failed}.</p>
<ol class="chapters">
{chr(10).join(rows)}
</ol>
</body>
</html>
"""


# --- the build -------------------------------------------------------------------------------


def build_book(notebooks_dir: str | Path = DEFAULT_NOTEBOOKS, out_dir: str | Path = DEFAULT_OUT,
               only: Iterable[str] | None = None, fast: bool | None = None,
               timeout: int = DEFAULT_TIMEOUT, offline: bool = True,
               log: Callable[[str], None] = print) -> BookResult:
    """Execute and render the notebooks of ``notebooks_dir`` into ``out_dir`` (one
    ``<notebook>.html`` per chapter and ``index.html``); see the module docstring."""
    from course_lib.runtime import machine_description

    notebooks_dir, out_dir = Path(notebooks_dir).resolve(), Path(out_dir)
    paths = find_notebooks(notebooks_dir, only)
    if not paths:
        which = f" matching {' '.join(only)}" if only else ""
        raise FileNotFoundError(f"no notebooks{which} in {notebooks_dir}")
    fast = default_fast() if fast is None else fast
    chapters = read_chapters(paths)
    result = BookResult(out_dir, chapters, fast, offline, machine_description())
    env = kernel_env(fast, offline)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"book: {len(chapters)} notebook(s) from {notebooks_dir}, "
        f"{'fast' if fast else 'full'} mode, {'offline' if offline else 'online'}, -> {out_dir}")
    start = time.perf_counter()
    for position, chapter in enumerate(chapters):
        nb = nbformat.read(chapter.source, as_version=4)
        t0 = time.perf_counter()
        chapter.error = execute_notebook(nb, notebooks_dir, env, timeout)
        chapter.seconds = time.perf_counter() - t0
        page = render_chapter(nb, chapters, position)
        (out_dir / chapter.html_name).write_text(page, encoding="utf-8")
        status = f"FAILED: {chapter.error}" if chapter.failed else "ok"
        log(f"  [{position + 1}/{len(chapters)}] {chapter.source.name}: {status} "
            f"({chapter.seconds:.1f} s, {len(page) / 1e6:.1f} MB)")
    result.seconds = time.perf_counter() - start
    result.failures = [c for c in chapters if c.failed]
    result.index.write_text(index_html(result, datetime.now(timezone.utc).astimezone()),
                            encoding="utf-8")
    return result


def book_cli(args) -> int:
    try:
        result = build_book(args.notebooks, args.out, only=args.only, fast=args.fast,
                            timeout=args.timeout, offline=not args.online)
    except FileNotFoundError as exc:
        print(f"course-lib book: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in result.out_dir.glob("*.html"))
    print(f"book: wrote {result.index} ({len(result.chapters)} chapter(s), {size / 1e6:.1f} MB) "
          f"in {result.seconds:.0f} s")
    if result.failures:
        print(f"book: {len(result.failures)} notebook(s) failed to execute "
              "(rendered up to the failing cell):", file=sys.stderr)
        for chapter in result.failures:
            print(f"  {chapter.source.name}: {chapter.error}", file=sys.stderr)
        return 1
    return 0
