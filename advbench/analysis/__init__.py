"""Matrices computed from adversarial examples beyond robust accuracy (issue 5): transfer
between models (:mod:`advbench.analysis.transfer_matrix`) and the destruction rate of image
transformations (:mod:`advbench.analysis.destruction`)."""
