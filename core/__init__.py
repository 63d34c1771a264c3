"""captcha-queue core: detector, data formats, training, evaluation, configuration and the Celery app.

Importing this package is cheap: nothing here imports torch until a model is built or loaded.
"""

__version__ = "0.1.0"
