"""python -m train.inspect --run RUN_DIR [--data FILE ...] [section.key=value ...]"""

import sys

from molora.cli import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
