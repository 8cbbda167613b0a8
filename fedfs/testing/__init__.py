"""Test support shipped in the package: toy work, synthetic nnU-Net data, toy party processes
and the backend conformance suite (``fedfs.testing.store``)."""
