import backbones._numerics  # noqa: F401  (reproducible MKL results; set before torch runs anything)
