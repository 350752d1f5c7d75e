"""python -m train.train --config configs/quickstart.yaml [--output-dir DIR] [--resume] [section.key=value ...]"""

import sys

from molora.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
