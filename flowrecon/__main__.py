"""``python -m flowrecon`` and the ``flowrecon`` command: signal handlers, then the CLI.

Example:
    $ python -m flowrecon --help
"""

import signal
import sys


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Installs the handlers before the heavy imports, then runs the command line.

    A SIGTERM or Ctrl-C that arrives while torch and the backends load ends the process as
    cleanly as one that arrives during work: exit 130, nothing written, no traceback.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from flowrecon.cli import run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
