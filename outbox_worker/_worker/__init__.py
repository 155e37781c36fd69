"""The worker's services, private to the package: what ``outbox_worker.Worker`` composes.

Nothing here is for applications to import; its shape changes with the worker's.
"""
