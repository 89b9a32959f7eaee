"""The ``elbolab`` command: ``elbolab demo [--out DIR] [--fast]``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``elbolab`` command line ``argv`` (default: ``sys.argv[1:]``); the exit status.

    0 done, 2 a bad command line or ``--out`` (one line on stderr, before anything runs).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: elbolab demo [--out DIR] [--fast]\n\n"
            "  demo   fit a Gaussian mixture to Old Faithful by EM (closed-form and gradient\n"
            "         M-steps) and by direct maximisation; print a table, write figures"
        )
        return 0
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    print(f"elbolab: unknown command {argv[0]!r}; try 'elbolab demo'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
