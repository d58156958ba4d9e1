"""What a command does before its heavy imports (torch takes seconds to load): a stop
while they load ends in one line and exit code 130, not a traceback. Import it first."""
import signal
import sys


def stop_quietly_while_starting():
    def stopped(signum, frame):
        print("\ninterrupted during start-up: nothing was written", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, stopped)
    signal.signal(signal.SIGTERM, stopped)
