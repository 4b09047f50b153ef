"""``python -m lorakit``: where the cache is and what is in it."""

import sys

from lorakit.assets import main

sys.exit(main(sys.argv[1:] or ["status"]))
