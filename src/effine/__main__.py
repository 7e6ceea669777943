"""``python -m effine ...``: the command line, and the entry torchrun starts on every rank.

    torchrun --nproc-per-node 2 -m effine train CONFIG

Under torchrun a failure names its rank (stderr and torchrun's error summary, via ``record``), and an error that
is a lost peer says so, instead of surfacing as a bare backend message.
"""

import os
import sys

from effine.cli import main

if __name__ == "__main__":
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from effine.train.distributed import run_as_rank

        sys.exit(run_as_rank(main))
    sys.exit(main())
