"""dermtrain: leakage-free HAM10000 training, evaluation and reporting for DermEdge."""
__version__ = "0.1.0"
