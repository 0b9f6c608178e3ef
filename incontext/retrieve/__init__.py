"""retrieve stage: a FAISS-indexed prompt bank of (image, mask, class) examples and the retriever that chooses
supports for a query from it.

>>> from incontext.retrieve import load_retriever
>>> r = load_retriever("prompts_bank/synthetic")
>>> hits = r.search("query.png", k=5)                 # best entries, any class
>>> supports = r.retrieve(query_array, [], k=3)       # Support objects for the pipeline
>>> r.rank_concepts("query.png", top=3)               # which of the bank's classes are in the image
"""

from incontext.retrieve.bank import BankItem, CorruptBankError, Entry, PromptBank, folder_items
from incontext.retrieve.config import load_config
from incontext.retrieve.embed import DinoV2Dense, EmbeddingSpec, FeatureEmbedder, build_embedder, content_hash
from incontext.retrieve.index import IndexConfig, VectorIndex
from incontext.retrieve.retriever import ConceptScore, Hit, Retriever, load_retriever
from incontext.retrieve.shards import merge_topk, search_shards

__all__ = [
    "BankItem",
    "ConceptScore",
    "CorruptBankError",
    "DinoV2Dense",
    "EmbeddingSpec",
    "Entry",
    "FeatureEmbedder",
    "Hit",
    "IndexConfig",
    "PromptBank",
    "Retriever",
    "VectorIndex",
    "build_embedder",
    "content_hash",
    "folder_items",
    "load_config",
    "load_retriever",
    "merge_topk",
    "search_shards",
]
