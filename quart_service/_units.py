"""Unit constants, so that defaults read as what they mean (``30 * SECONDS``)."""

from __future__ import annotations

SECONDS = 1.0
MILLISECONDS = SECONDS / 1000
BYTES = 1
KIB = 1024 * BYTES
MIB = 1024 * KIB
