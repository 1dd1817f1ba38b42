"""python -m edgellm: the same command line as `edgellm`."""

import sys

from edgellm.cli import main

sys.exit(main())
