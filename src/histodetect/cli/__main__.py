"""`python -m histodetect.cli` (and `torchrun ... -m histodetect.cli`): the `histodetect` command."""

import sys

from . import main

sys.exit(main())
