"""`python -m grouprl ...` (and `torchrun ... -m grouprl train run.yaml`): the CLI."""

import sys

from grouprl.cli import main

if __name__ == "__main__":
    sys.exit(main())
