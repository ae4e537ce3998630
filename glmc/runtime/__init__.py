"""The multi-rank runtime: workers per tensor-parallel rank, commands from rank 0, failure handling."""
