"""``python -m cdrl_diffusers`` runs the ``cdrl-diffusers`` command line."""

import sys

from .cli import main

sys.exit(main())
