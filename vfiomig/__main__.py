import sys

from vfiomig._cli import main

sys.exit(main())
