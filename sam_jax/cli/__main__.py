"""`python -m sam_jax.cli ...`: the same as the `sam-jax` console script."""

import sys

from sam_jax.cli import main

sys.exit(main())
