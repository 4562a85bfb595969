"""Encoders of the embedding store: CLIP image embeddings, InsightFace faces, and their ids."""
