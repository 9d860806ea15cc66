"""Tests of ``cxr-node evaluate`` and ``models.evaluation`` (issue #28)."""
