import sys

from fitserve.cli import main

sys.exit(main())
