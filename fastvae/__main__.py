"""``python -m fastvae ...`` (and ``torchrun ... -m fastvae train ...``): the ``fastvae`` command."""

import sys

from fastvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
