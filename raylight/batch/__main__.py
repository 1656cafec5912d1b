"""`python -m raylight.batch` (under torchrun: `torchrun --nproc-per-node N -m raylight.batch ...`)."""

import sys

from raylight.batch.job import main

if __name__ == "__main__":
    sys.exit(main())
