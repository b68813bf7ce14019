import sys

from sealedsum.commands import main

sys.exit(main())
