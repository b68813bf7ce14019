import sys

from sealedsum.cli import main

sys.exit(main())
