"""`python -m dbpgen` is the `dbpgen` command line."""
import sys

from .cli import main

sys.exit(main())
