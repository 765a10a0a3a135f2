"""Command-line front ends: ``python -m diffbias_core info`` and the ``dissect`` pipeline commands."""
