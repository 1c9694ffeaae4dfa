import sys

from camtl.cli import main

sys.exit(main())
