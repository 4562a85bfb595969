"""Embedding encoders: CLIP image encoders and InsightFace face analysis."""
