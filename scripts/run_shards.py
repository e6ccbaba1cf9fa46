"""Run pytest as TEST_SHARDS processes (default 2) that share the suite file by file.

Usage (scripts/test does this): ``python3 scripts/run_shards.py [pytest arguments]``. Each
process gets the same arguments plus ``--shard-claims=DIR`` (one word, or pytest would take DIR
for a test path when it looks for its rootdir), and takes test files from the suite
as it becomes free (tests/sharding.py). The first process prints as it goes; the others' output
follows when all have ended, then one line per process with its summary. The exit status is the first
failing process's (pytest's "no tests ran", 5, counts as a failure only when every process has
it). TEST_SHARDS=1 runs pytest alone, as before.

Two processes because the suite mostly waits (TTLs, server start-ups, elections): on two cores
the whole suite takes about half as long.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile

NO_TESTS = 5  # pytest's exit status when it ran no test
STOP_GRACE = 10.0  # seconds a pytest process has to end after SIGTERM before SIGKILL


def main(args: list[str]) -> int:
    count = int(os.environ.get("TEST_SHARDS", "2"))
    command = [sys.executable, "-m", "pytest", *args]
    if count <= 1:
        return subprocess.call(command)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with tempfile.TemporaryDirectory(prefix="greenleader-shards-") as claims, contextlib.ExitStack() as files:
        processes, outputs = [], []
        try:
            for index in range(count):
                env = dict(os.environ, GREENLEADER_TEST_SHARD=f"{index}/{count}")
                output = (files.enter_context(open(os.path.join(claims, f"output-{index}"), "w+"))
                          if index else subprocess.PIPE)
                outputs.append(output)
                processes.append(subprocess.Popen([*command, f"--shard-claims={claims}"], env=env,
                                                  stdout=output, stderr=subprocess.STDOUT, text=True))
            last = "(no output)"
            for line in processes[0].stdout:  # the first process's output, as it comes
                print(line, end="", flush=True)
                last = line.strip() or last
            summaries = [last]
            codes = [process.wait() for process in processes]
        finally:
            for process in processes:  # interrupted: stop them too (their servers die with them)
                if process.poll() is None:
                    process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for index, output in enumerate(outputs[1:], start=1):
            output.seek(0)
            text = output.read()
            print(f"\n======== pytest process {index + 1} of {count} ========", flush=True)
            print(text, end="", flush=True)
            summaries.append(text.strip().splitlines()[-1] if text.strip() else "(no output)")
    print(f"\n======== {count} pytest processes ========")
    for index, (code, summary) in enumerate(zip(codes, summaries, strict=True)):
        print(f"process {index + 1}: exit {code}: {summary}")
    failed = [code for code in codes if code not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(code == NO_TESTS for code in codes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
