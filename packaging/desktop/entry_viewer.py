"""PyInstaller entry point of the bundled `dermviewer`."""
import sys

from dermviewer.app import main

if __name__ == "__main__":
    sys.exit(main())
