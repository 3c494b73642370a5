"""MuSc core: pure torch/numpy implementation of the method (no Dagster, no data I/O; the one
exception is :mod:`msm_kernel` compiling its C source into a temporary folder once per process).

Modules, in the order data flows through them:

- :mod:`preprocess`  image and mask arrays -> model input and S×S ground truth
- :mod:`backbone`    registry of backbones; stage taps + image embedding
- :mod:`lnamd`       local neighbourhood aggregation with multiple degrees (LNAMD)
- :mod:`msm`         mutual scoring module (MSM), the hot loop (:mod:`msm_kernel`: its C box filter)
- :mod:`maps`        patch scores -> S×S anomaly maps and image scores
- :mod:`rscin`       re-scoring with constrained image-level neighbourhood (RsCIN)
- :mod:`snamd`, :mod:`rscon`  MuSc-V2's similarity-weighted pooling and re-scoring (method variants)
- :mod:`ablation`    re-aggregation of stored nearest-patch similarities for the paper's studies
- :mod:`subsets`     subset division of a large test set
- :mod:`metrics`     image/pixel AUROC, AP, F1-max and PRO
"""
