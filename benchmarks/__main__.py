"""``python -m benchmarks``: run the benchmarks (see benchmarks/cli.py)."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from benchmarks.cli import main  # noqa: E402

sys.exit(main())
