"""``python -m lorakit.assets fetch|status``."""

import sys

from lorakit.assets import main

sys.exit(main())
