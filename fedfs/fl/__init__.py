"""Pure federated-learning logic: layer alignment across nnU-Net networks, FFE fingerprint
merging, plans comparison, and aggregation rules and planning. No I/O, no torch."""
