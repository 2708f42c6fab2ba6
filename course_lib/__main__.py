"""``python -m course_lib`` is the same as the ``course-lib`` command."""

from course_lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
