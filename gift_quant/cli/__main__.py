"""``python -m gift_quant.cli``: the same as the ``gift-quant`` command."""

import sys

from . import main

sys.exit(main())
