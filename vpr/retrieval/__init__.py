"""Retrieval: descriptor extraction, FAISS / torch nearest-neighbour search, index directories."""
