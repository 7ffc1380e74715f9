"""``python -m e3relax_fast <command> ...`` (what ``torchrun ... -m e3relax_fast relax ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
