"""PyInstaller entry point of the bundled `dermscan`."""
import sys

from engines.scan.cli import main

if __name__ == "__main__":
    sys.exit(main())
