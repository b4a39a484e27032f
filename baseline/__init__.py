"""Unsupervised baselines on the same data and evaluation: PaDiM, PatchCore and an SSIM autoencoder.

Each is a plain `nn.Module` (what gets saved) that maps images in [0, 1] to `{"mask": logits, "image": None}`,
where the logits are the anomaly map standardised on held-out OK crops (0 at the normal 99.9th percentile), so
the ensemble's TTA, calibration, post-processing, submission writer and evaluation serve them unchanged.
"""
