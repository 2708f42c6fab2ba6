"""`course-lib book`: executed notebooks rendered to static HTML with their figures, an index and
chapter navigation; a notebook that raises is still rendered and makes the build fail.

One build of two small synthetic notebooks (the course's own take about a minute each on a CPU);
a third notebook is left out with --only.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_lib import book
from course_lib.cli import main

PLOT_GOALS = ("**Learning goals.** After this notebook you can:\n\n"
              "1. draw a `line` with [matplotlib](https://matplotlib.org);\n2. see it on the page.")


def _write(path: Path, cells) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run `course-lib book` once, as `make test` would (MPLBACKEND=Agg in the environment)."""
    root = tmp_path_factory.mktemp("book")
    notebooks, out = root / "notebooks", root / "html"
    notebooks.mkdir()
    (notebooks / "data.txt").write_text("read through a relative path\n")
    _write(notebooks / "01_plot.ipynb", [
        new_markdown_cell("# 01 · A plot\n\n" + PLOT_GOALS),
        new_code_cell("import os\nimport matplotlib.pyplot as plt\n\n"
                      "print(open('data.txt').read().strip(), '| fast:', os.environ.get('COURSE_FAST'))\n"
                      "fig, ax = plt.subplots(figsize=(2, 2))\nax.plot([0, 1], [1, 0])\n"
                      "ax.set_title('a line');"),
    ])
    _write(notebooks / "02_broken.ipynb", [
        new_markdown_cell("# 02 · Broken\n\nThis chapter raises halfway."),
        new_code_cell("print('before the error')"),
        new_code_cell("raise ValueError('boom in cell two')"),
        new_code_cell("print('never printed')"),
    ])
    _write(notebooks / "03_left_out.ipynb", [new_markdown_cell("# 03 · Left out"),
                                             new_code_cell("1 + 1")])
    mp = pytest.MonkeyPatch()
    mp.setenv("MPLBACKEND", "Agg")
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["book", "--notebooks", str(notebooks), "--out", str(out),
                       "--only", "01", "02", "--fast", "--timeout", "120"])
    finally:
        mp.undo()
    return rc, stdout.getvalue() + stderr.getvalue(), out


def _page(out: Path, name: str) -> str:
    return (out / name).read_text(encoding="utf-8")


def _nav_links(page: str) -> list[str]:
    navs = re.findall(r'<nav class="book-nav">(.*?)</nav>', page, flags=re.S)
    assert len(navs) == 2, "a navigation bar at the top and the bottom of every chapter"
    return re.findall(r'href="([^"]+)"', navs[0])


def test_chapter_page_has_its_outputs_and_figure_inline(built):
    rc, log, out = built
    page = _page(out, "01_plot.html")
    assert "<title>01 · A plot</title>" in page
    assert "read through a relative path | fast: 1" in page  # ran in the notebooks folder, fast
    images = re.findall(r'<img\b[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]{200,})"', page)
    assert images, "the matplotlib figure is embedded in the page as a PNG data URI"
    assert "01_plot.ipynb: ok" in log


def test_index_lists_the_chapters_in_order_with_their_goals(built):
    _, _, out = built
    index = _page(out, "index.html")
    links = re.findall(r'<li class="chapter"><a href="([^"]+)">([^<]+)</a>', index)
    assert links == [("01_plot.html", "01 · A plot"), ("02_broken.html", "02 · Broken")]
    assert "<li>draw a line with matplotlib;</li>" in index
    assert "fast" in index and "03" not in "".join(href for href, _ in links)
    assert not (out / "03_left_out.html").exists()


def test_navigation_links_point_to_existing_pages(built):
    _, _, out = built
    first, second = _nav_links(_page(out, "01_plot.html")), _nav_links(_page(out, "02_broken.html"))
    assert first == ["index.html", "02_broken.html"]
    assert second == ["01_plot.html", "index.html"]
    for href in first + second:
        assert (out / href).is_file(), href


def test_a_failing_notebook_is_rendered_and_fails_the_build(built):
    rc, log, out = built
    assert rc == 1
    assert "02_broken.ipynb: cell 2 (0-based) raised ValueError: boom in cell two" in log
    page = _page(out, "02_broken.html")
    assert "<pre>before the error" in page  # the cells before it, with their outputs
    assert "ValueError" in page and "boom in cell two" in page  # the traceback
    assert "<pre>never printed" not in page  # execution stopped at the error
    assert 'class="book-failed"' in page
    assert "did not run to the end" in _page(out, "index.html")


def test_no_matching_notebook_is_an_error(tmp_path, capsys):
    assert main(["book", "--notebooks", str(tmp_path), "--out", str(tmp_path / "html")]) == 2
    assert "no notebooks" in capsys.readouterr().err


def test_titles_goals_and_modes():
    nb = new_notebook(cells=[new_code_cell("x = 1"),
                             new_markdown_cell("Intro text.\n\n## Two *words* ##\n\nMore.")])
    assert book.chapter_title(nb, "fallback") == "Two words"
    assert book.chapter_title(new_notebook(), "fallback") == "fallback"
    assert book.learning_goals(nb) == ["Intro text."]
    long = new_notebook(cells=[new_markdown_cell("# T\n\n1. " + "word " * 100)])
    (goal,) = book.learning_goals(long, item_chars=40)
    assert len(goal) <= 40 and goal.endswith("…")
    env = book.kernel_env(fast=False, base={"COURSE_FAST": "1", "MPLBACKEND": "Agg"})
    assert "COURSE_FAST" not in env and env["COURSE_OFFLINE"] == "1"
    assert env["MPLBACKEND"] == book.INLINE_BACKEND  # ipykernel would not capture figures on Agg
    assert book.kernel_env(fast=True, base={})["COURSE_FAST"] == "1"
