"""Uncertainty of the metrics: intervals for one category's metrics, paired differences of two
score sets on the same images, means over categories (``docs/intervals.md``).

- :mod:`delong`       DeLong's AUROC variance and paired test (image AUROC)
- :mod:`resample`     stratified bootstrap over images as multiplicities; percentile intervals
- :mod:`pixel_stats`  per-image counts that give every pixel metric of a resample of images
- :mod:`category`     the 7 metrics of a category together; means over categories
"""
