"""Repository code index: walking, chunking, BM25 search, retrieval for completions."""
