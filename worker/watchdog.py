"""A launched script's watchdog: SIGKILL process group PGID when the worker daemon dies.

    python -I -S watchdog.py PGID      (stdin: a pipe whose write end only the daemon holds)

It blocks reading stdin. End-of-file without a byte means the daemon is gone (the kernel closed
its end, also after SIGKILL): the group is killed. A byte means the daemon ended the group itself
and reaped it: the watchdog exits without a kill, since the group id may be reused. It imports
nothing of gymbus, so that it starts fast (worker/orphans.py starts it).
"""

import os
import signal
import sys


def main(argv: list[str]) -> int:
    pgid = int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe decides
    if not sys.stdin.buffer.read(1):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
