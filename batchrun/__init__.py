"""batchrun: run big offline inference jobs against Inference Endpoints, safely.

spec -> source -> dispatch -> sink, with the endpoint lifecycle wrapped around dispatch.
"""

__version__ = "0.1.0"
