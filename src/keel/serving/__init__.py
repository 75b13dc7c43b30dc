"""One serving object per feature (completion, chat, embedding), in the style of
vLLM's ``serving.py``: each owns a request's whole life (admission, superseding,
cancellation when the client goes away, the router's attempts, postprocessing,
usage, events, metrics); the routes in :mod:`keel.api` only parse and hand over."""
