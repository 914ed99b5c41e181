"""`resunet serve`: an HTTP service and a web page for a trained model (FastAPI under uvicorn).

    from resunet.serve import create_app
    app = create_app("runs/demo/best.pt")  # or an exported .onnx; run it under any ASGI server
"""

from .app import ServeSettings, bind_address, create_app, run_server, service_url

__all__ = ["ServeSettings", "bind_address", "create_app", "run_server", "service_url"]
