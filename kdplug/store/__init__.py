"""The teacher store: run every teacher once (``kdplug cache``), distill many times.

Per row of each cached DATA the store keeps V views (view 0 the plain input, the others
random crops/flips whose parameters rebuild them exactly) and, per view and teacher, the
log-probabilities of the top-k classes (or of all classes). See docs/store.md.

- ``kdplug.engines.cache``: the cache engine (``CacheConfig``, ``run_cache``);
- ``kdplug.store.reader``: ``open_store`` and the checks of a store against its inputs;
- ``kdplug.store.producer``: the store as distill's teacher-output producer;
- ``kdplug.store.topk``: full distributions rebuilt from top-k entries;
- ``kdplug.store.layout``: the files and arrays.
"""
