"""The producer side of the queue: scanning folders, registering images as jobs, sending them to the workers.

``scan`` and ``enqueue`` never import torch (tasks are sent by name); ``demo`` runs the whole pipeline on one machine.
"""
