import sys

from aiflow.cli import main

sys.exit(main())
