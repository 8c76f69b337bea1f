"""ringserve: a serving cluster for million-token LLM contexts.

The import packages ``ringserve.cluster``, ``ringserve.workers``, ``ringserve.kernels``,
``ringserve.proto`` and ``ringserve.client`` live in the top-level folders of the same names
(mapped in pyproject.toml).
"""

__version__ = "0.1.0"
