"""Analyses beyond robust accuracy: transfer between models
(:mod:`advbench.analysis.transfer_matrix`), the destruction rate of image transformations
(:mod:`advbench.analysis.destruction`), and input-space curvature (issue 14, in progress): the
input Hessian's products, spectra and curvature (:mod:`advbench.analysis.hessian`), spectrum
divergences (:mod:`advbench.analysis.spectra`), the seed's perturbability measures
(:mod:`advbench.analysis.perturbability`) and the statistics relating them
(:mod:`advbench.analysis.stats`)."""
