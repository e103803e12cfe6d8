"""dermtrain: leakage-free HAM10000 training, evaluation and reporting for DermEdge."""
from engines.version import __version__  # noqa: F401 - one version for the project
