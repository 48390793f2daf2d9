"""`python -m embedder.data.download`: see the package docstring."""

import sys

from embedder.data.download.cli import main

sys.exit(main())
