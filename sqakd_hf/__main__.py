"""``python -m sqakd_hf``: the ``sqakd-hf`` command line (see :mod:`sqakd_hf.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
