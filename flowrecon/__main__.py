"""``python -m flowrecon``: the same command line as ``flowrecon``."""

from flowrecon.cli import main

if __name__ == "__main__":
    main()
