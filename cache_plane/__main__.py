"""`python -m cache_plane` is the `cache-plane` command."""

import sys

from .cli import main

sys.exit(main())
