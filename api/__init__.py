"""The HTTP API (FastAPI). It never imports torch or `mola`'s model code: requests are checked
through `service/`, and training happens in the worker."""
