"""Files and folders: atomic, checksummed writes and disk room (storage), folder trust (trust), the one
locked, keyed store (store) under the teacher cache (cache) and the decoded images, and a run folder's
ownership (run_folder).

Docs: docs/architecture.md
"""
