"""``python -m flowrecon``: the same command line as ``flowrecon``."""

import signal
import sys


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Before the heavy imports: a SIGTERM or Ctrl-C that arrives while they load ends the
# process as cleanly as one that arrives during work (exit 130, nothing written).
signal.signal(signal.SIGTERM, _interrupt)
try:
    from flowrecon.cli import run
except KeyboardInterrupt:
    sys.stderr.write("interrupted: nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    run()
