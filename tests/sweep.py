"""The seed sweep: ``python -m tests.sweep N [pytest arguments]`` runs the randomized tests under N seeds.

The same as ``python -m pytest --seeds N [pytest arguments]`` (see ``tests/conftest.py``), quiet and without
pytest's cache; ``--seed-start S`` begins at seed S. For example, one op test module under 200 seeds, at the
lowest priority so that the machine stays usable::

    nice -n 19 python -m tests.sweep 200 tests/test_reparameterize_kl.py
"""

import sys

import pytest


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    return int(pytest.main(["-q", "-p", "no:cacheprovider", f"--seeds={argv[0]}", *argv[1:]]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
