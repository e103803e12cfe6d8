"""dermtrain: leakage-free HAM10000 training, evaluation and reporting for DermEdge."""
from engines.version import __version__

__all__ = ["__version__"]  # one version for the project: engines/version.py
