"""Decisions: which transfer-learning case fits the data (size and similarity measured), and whether a
retrained challenger replaces the champion."""
