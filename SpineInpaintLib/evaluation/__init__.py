"""Judgement: metrics, per-stage evaluation against the truth, benchmarks, the demo case, figures, model cards."""
