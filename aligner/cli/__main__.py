"""``python -m aligner.cli`` (and ``torchrun -m aligner.cli``): the ``aligner`` command."""

import sys

from . import main

sys.exit(main())
