"""python -m train.ranks [--model NAME] [--run RUN_DIR] [--targets ...] [--out DIR]"""

import sys

from molora.cli import ranks_main

if __name__ == "__main__":
    sys.exit(ranks_main())
