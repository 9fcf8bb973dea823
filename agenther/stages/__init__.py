"""The pipeline's stages, one module each: ingest, classify, extract, relabel, verify, package."""
