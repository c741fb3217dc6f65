import os
import sys

if not __package__:
    # Run by path (`python3 .../app/refengine`), not as `-m app.refengine`: any interpreter can
    # run it, with no PYTHONPATH, e.g. one that engines run as another user can reach.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# http.client (under http.server) imports ssl only to offer HTTPS clients, which this engine
# never is; refusing the import saves a few milliseconds of every boot. Done here, at the
# process's entry, so that importing the server elsewhere (tests) changes nothing.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from app.refengine.boot import main  # noqa: E402 - after the ssl refusal, on purpose

sys.exit(main())
