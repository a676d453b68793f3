"""carcert core: pure-PyTorch CAR pruning and CC-Cert certification (no HTTP, SQL or Celery)."""

__version__ = "0.1.0"
