"""Data with ground truth: phantoms, lesion simulators, cases and their splits, the DeepLesion format, real scans."""
