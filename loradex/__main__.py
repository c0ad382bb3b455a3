"""``python -m loradex``: the same as the ``loradex`` command."""
import sys

from loradex.cli import main

sys.exit(main())
