"""``python -m runtime``: see ``runtime.cli``."""

import sys

from runtime.cli import main
from runtime.lifeline import die_with_parent

die_with_parent()
sys.exit(main())
