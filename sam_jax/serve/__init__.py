"""`sam-jax serve`: interactive segmentation in the browser.

    service.py   SegmentationService: one model, the embedding cache, prompts, "everything"
    cache.py     ByteLRU: a byte-bounded LRU that computes each key once
    api.py       create_app: the FastAPI app (JSON API, OpenAPI at /docs, the page)
    static/      the page: plain HTML, CSS and JavaScript, no build step
"""
