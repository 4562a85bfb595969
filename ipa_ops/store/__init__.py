"""The embedding store: a content-addressed Parquet dataset (dataset.py, schema.py), safe import of
torch-saved embeddings (imports.py), the CLIP and InsightFace encoders and their ids (encoders/),
and reading and decoding reference images from any fsspec URI (images.py).

Imports the flow format only; the extract stage fills it, planning reads it.
"""
