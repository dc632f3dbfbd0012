"""``python -m sqakd_hf``: the ``sqakd-hf`` command line (see :mod:`sqakd_hf.app.cli`)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
