"""``python -m pytest_envbox.cli``: the ``envbox`` command."""

import sys

from pytest_envbox.cli import main

sys.exit(main())
