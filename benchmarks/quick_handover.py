"""Graceful handover and crash failover per store: now sections of ``python -m benchmarks``.

    python benchmarks/quick_handover.py [--kinds file,consul,etcd,zookeeper] [--trials 5] [--modes handover,failover]

Kept for this command line; it runs ``python -m benchmarks handover failover --trials N`` into
a temporary directory (see benchmarks/handover.py for what is measured).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import main as benchmarks_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="file,consul,etcd,zookeeper")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--modes", default="handover,failover", help="handover (graceful), failover (SIGKILL)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="greenleader-quick-handover-") as out:
        return benchmarks_main([*args.modes.split(","), "--kinds", args.kinds, "--trials", str(args.trials),
                                "--out", out, "--no-plots"])


if __name__ == "__main__":
    sys.exit(main())
