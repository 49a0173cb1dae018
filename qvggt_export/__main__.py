import sys

from qvggt_export.cli import main

sys.exit(main())
