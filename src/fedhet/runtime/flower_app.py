"""The project's Flower app: the objects named in ``[tool.flwr.app.components]``.

``flwr run .`` loads ``server_app`` and ``client_app`` from here. The ServerApp
reads the experiment from the run config (``config``, ``set``, ``min-nodes``,
``wait-timeout``, ``server-eval``, ``clock``: see :mod:`fedhet.runtime.flower`) and ships it
to the ClientApps with every message.
"""

from fedhet.runtime.flower import make_server_app
from fedhet.runtime.flower_client import make_client_app

server_app = make_server_app()
client_app = make_client_app()
