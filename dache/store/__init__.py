"""The store: the in-memory map, group commit, and following other nodes' changes.

Nothing here knows HTTP; engines (dache.engines) know nothing of this package.
"""
