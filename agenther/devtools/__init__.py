"""Development tooling, not part of the product: the local SeaweedFS S3 for the demo and tests."""
