"""A team blueprint module whose import fails (a missing dependency, say)."""

raise ImportError("team dependency 'missing_lib' is not installed")
