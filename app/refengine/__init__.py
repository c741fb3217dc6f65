"""The reference engine (`python -m app.refengine`); see server.py for its contract."""
