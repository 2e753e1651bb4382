"""Measurement instruments for large-batch training research.

- :mod:`lbtrain.instruments.gns`: gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).
- :mod:`lbtrain.instruments.hessian`: sharpness, i.e. the top Hessian eigenvalue (Lanczos) and the Hessian trace
  (Hutchinson), from Hessian-vector products (compare PyHessian, Yao et al. 2020).

Both are self-contained (torch and numpy only) and import nothing else from lbtrain.
"""
