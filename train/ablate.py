"""python -m train.ablate --config configs/ablation.yaml [--quick] [--output-dir DIR]"""

import sys

from molora.cli import ablate_main

if __name__ == "__main__":
    sys.exit(ablate_main())
