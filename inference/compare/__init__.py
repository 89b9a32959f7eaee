"""Comparing inference schemes on one model: the table, the scheme registry and the schemes."""

from .table import Comparison, Selection, compare, select_k

__all__ = ["Comparison", "Selection", "compare", "select_k"]
