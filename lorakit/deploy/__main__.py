"""``python -m lorakit.deploy --adapter DIR --to merged|onnx-int4|onnx-fp32|gguf-q8_0|gguf-q4_1 --out DIR``.

Errors found before any work (a missing or corrupt adapter, one made for another base, an unknown target,
an output folder that holds files without ``--overwrite``) end with one line on stderr and exit code 2.
"""

import sys

from lorakit.deploy.cli import PROG, main
from lorakit.runtime import run_main

if __name__ == "__main__":
    sys.exit(run_main(main, prog=PROG))
