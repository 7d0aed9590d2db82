import sys

from mola.cli import main

sys.exit(main())
